"""Exact pooled statistics of a BN layer's input over many batches.

Per batch, a BN call's input gives a count, a mean and a biased variance
per feature (`input_moments`, through the core's
`tfbn.nn.moments.batch_moments`). `MomentPool` combines them with Chan et
al.'s pairwise update in float64: `mean = sum(n_b * mean_b) / N` and
`var = sum(n_b * (var_b + (mean_b - mean)**2)) / N`, the mean and variance
of *all* values, as if the dataset were one batch. `PopulationMoments` is
the result.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from tfbn.layers import introspection
from tfbn.nn import moments as moments_lib
from tfbn.tools import stored_statistics


@dataclasses.dataclass(frozen=True)
class PopulationMoments:
    """Pooled statistics of one BN layer's input over a dataset.

    Attributes:
        mean: float64 array in the layer's parameter shape.
        variance: The biased (divide by N) pooled variance, same shape.
        count: N, the number of values per feature (same shape).
        num_calls: How many batches (layer calls) were pooled.
    """

    mean: np.ndarray
    variance: np.ndarray
    count: np.ndarray
    num_calls: int

    def stored_variance(self, estimator: str) -> np.ndarray:
        """The variance as a layer with `estimator` stores it.

        Args:
            estimator: `"biased"` or `"unbiased"`.

        Returns:
            A float64 array (see `stored_statistics.stored_variance`).

        Raises:
            ValueError: For an unknown estimator, or `"unbiased"` with fewer
                than 2 values per feature.
        """
        return stored_statistics.stored_variance(self.variance, self.count, estimator)


def input_moments(layer, inputs, mask):
    """Count, mean and biased variance of one BN call's input.

    Works eagerly and inside a `tf.function`.

    Args:
        layer: The BN layer (its axes say which axes are features).
        inputs: The tensor the layer is called on.
        mask: The call's Keras mask (the input's shape without the last axis), or None.

    Returns:
        `(count, mean, variance)` float32 tensors.
    """
    x = tf.convert_to_tensor(inputs)
    rank = x.shape.rank
    axes = introspection.feature_axes(layer, rank)
    if mask is not None:
        # Keras' convention, as the layers apply it: the mask is the input's shape
        # without the last axis, whichever axes are features.
        mask = tf.expand_dims(tf.cast(mask, tf.float32), -1)
    reduction = [axis for axis in range(rank) if axis not in axes]
    stats = moments_lib.batch_moments(x, reduction, mask=mask)
    return stats.count, stats.mean, stats.variance


class MomentPool:
    """Chan et al.'s pairwise combination of (count, mean, sum of squares), float64.

    Args:
        layer: The BN layer whose input is pooled.
        refuse_non_finite: Raise on a batch whose mean or variance is NaN or
            infinite, instead of pooling it.
    """

    def __init__(self, layer, refuse_non_finite: bool = True):
        shape = introspection.param_shape(layer)
        self.layer = layer
        self.refuse_non_finite = refuse_non_finite
        self.count = np.zeros(shape)
        self.mean = np.zeros(shape)
        self.squares = np.zeros(shape)
        self.num_calls = 0

    def add(self, count, mean, variance, batch_index: int) -> None:
        """Pools one call's `input_moments`.

        Args:
            count: Values per feature (a scalar or the parameter shape).
            mean: The call's mean per feature.
            variance: The call's biased variance per feature.
            batch_index: Which batch it came from, for the error message.

        Raises:
            ValueError: For a non-finite mean or variance when
                `refuse_non_finite`.
        """
        shape = self.mean.shape
        mean = np.asarray(mean, np.float64).reshape(shape)
        variance = np.asarray(variance, np.float64).reshape(shape)
        if self.refuse_non_finite and not (
            np.all(np.isfinite(mean)) and np.all(np.isfinite(variance))
        ):
            raise ValueError(
                f"BN layer {self.layer.path!r} received values whose mean or variance is "
                f"NaN or infinite in batch {batch_index} (counting from 0); no statistic "
                "was changed. Check that batch and the layers before this one."
            )
        count = np.asarray(count, np.float64)
        count = np.broadcast_to(count.reshape(shape) if count.ndim else count, shape)
        self.num_calls += 1
        total = self.count + count
        weight = np.divide(count, total, out=np.zeros_like(total), where=total > 0)
        delta = mean - self.mean
        self.squares = self.squares + count * variance + delta**2 * self.count * weight
        self.mean = self.mean + delta * weight
        self.count = total

    def result(self) -> PopulationMoments:
        """The pooled statistics so far."""
        variance = np.divide(
            self.squares, self.count, out=np.zeros_like(self.squares), where=self.count > 0
        )
        return PopulationMoments(self.mean, variance, self.count, self.num_calls)
