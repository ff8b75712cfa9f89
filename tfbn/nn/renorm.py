"""Batch Renormalization (Ioffe, 2017): the correction and its moving statistics.

In training mode Batch Renormalization normalizes with the batch statistics
and then corrects towards moving ones, `y = gamma * (r * x_hat + d) + beta`
with `r = batch_stddev / renorm_stddev` and `d = (batch_mean - renorm_mean) /
renorm_stddev`, both clipped and treated as constants by the gradient. The
inference statistics are kept as a moving *stddev*, from which the moving
variance is derived.

The numerics and the extra variables (`moving_stddev`, `renorm_mean`,
`renorm_stddev`) are those of tf-keras and Keras 3. `tfbn.BatchNormalization`
and `tfbn.compat.v1` both call these functions, so they produce the same
numbers. TF1.x's zero-debiased renorm statistics (`renorm_mean_weight`,
`renorm_stddev_weight`) are not part of this layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import tensorflow as tf

from tfbn.nn import moving_averages

CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def validate_clipping(renorm_clipping: Mapping | None) -> dict:
    """Checks a `renorm_clipping` dict; returns a copy (`{}` for None).

    Args:
        renorm_clipping: None or a dict with optional keys `"rmax"`, `"rmin"`
            and `"dmax"`; a missing key (or None) does not clip.

    Returns:
        The clipping as a new dict.

    Raises:
        ValueError: For an unknown key, `rmax < rmin` or a negative `dmax`.
    """
    clipping = dict(renorm_clipping or {})
    unknown = set(clipping) - set(CLIPPING_KEYS)
    if unknown:
        raise ValueError(
            f"`renorm_clipping` has unknown keys {sorted(unknown)}; the keys are "
            f"{list(CLIPPING_KEYS)}. Received invalid keys for renorm_clipping: "
            f"{renorm_clipping!r}."
        )
    rmin, rmax, dmax = (clipping.get(key) for key in ("rmin", "rmax", "dmax"))
    if rmin is not None and rmax is not None and rmax < rmin:
        raise ValueError(
            f"`renorm_clipping` needs rmax >= rmin; received rmin={rmin}, rmax={rmax}."
        )
    if dmax is not None and dmax < 0:
        raise ValueError(f"`renorm_clipping` needs dmax >= 0; received dmax={dmax}.")
    return clipping


def stddev_from_variance(variance, epsilon: float):
    """The stddev renorm keeps for a variance, `sqrt(variance + epsilon)`."""
    return tf.sqrt(variance + epsilon)


def correction(
    mean: tf.Tensor,
    variance: tf.Tensor,
    renorm_mean: tf.Tensor,
    renorm_stddev: tf.Tensor,
    epsilon: float,
    clipping: Mapping,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The correction `(r, d)` of one batch, clipped, without gradient.

    Args:
        mean: float32 batch mean.
        variance: float32 biased batch variance, shaped like `mean`.
        renorm_mean: The renorm moving mean, broadcastable against `mean`.
        renorm_stddev: The renorm moving stddev, likewise.
        epsilon: The layer's epsilon (inside the stddev, and its square root
            as a floor for `renorm_stddev`).
        clipping: A validated `renorm_clipping` dict (see `validate_clipping`).

    Returns:
        `(r, d)`, float32, shaped like `mean`, wrapped in `stop_gradient`.
    """
    stddev = stddev_from_variance(variance, epsilon)
    # The floor keeps r and d finite early in training, as tf-keras and Keras do.
    renorm_stddev = tf.maximum(renorm_stddev, tf.sqrt(epsilon))
    r = stddev / renorm_stddev
    d = (mean - renorm_mean) / renorm_stddev
    if clipping.get("rmin") is not None:
        r = tf.maximum(r, clipping["rmin"])
    if clipping.get("rmax") is not None:
        r = tf.minimum(r, clipping["rmax"])
    if clipping.get("dmax") is not None:
        d = tf.clip_by_value(d, -clipping["dmax"], clipping["dmax"])
    return tf.stop_gradient(r), tf.stop_gradient(d)


@dataclasses.dataclass(frozen=True)
class RenormStatistics:
    """The moving statistics a renorm layer keeps (tensors, one per feature)."""

    moving_stddev: tf.Tensor
    moving_variance: tf.Tensor
    renorm_mean: tf.Tensor
    renorm_stddev: tf.Tensor


def updated_statistics(
    old: RenormStatistics,
    mean: tf.Tensor,
    variance: tf.Tensor,
    *,
    epsilon: float,
    momentum: float | None,
    renorm_momentum: float,
    valid: tf.Tensor,
    num_batches: tf.Tensor | None = None,
) -> RenormStatistics:
    """The new values of the renorm moving statistics after one batch.

    The moving mean is not renorm-specific and is not included. Every new
    value is `where(valid, new, old)`, so an untrusted batch leaves each
    statistic bit-identical.

    Args:
        old: The current values. Pass each variable's value read once, and
            use the same tensors in the forward pass: a second read in a TF1
            `Session` may see an update that already ran.
        mean: float32 batch mean, shaped like the statistics.
        variance: float32 batch variance under the caller's estimator.
        epsilon: Added to the variance inside every stddev.
        momentum: Momentum of `moving_stddev` (Keras convention), or None
            for the cumulative average over `num_batches`.
        renorm_momentum: Momentum of `renorm_mean` and `renorm_stddev`.
        valid: Scalar `tf.bool`, whether the batch may update anything.
        num_batches: Batches already averaged, when `momentum` is None.

    Returns:
        A `RenormStatistics` of the new values. The moving variance is
        derived from the new moving stddev, `relu(stddev^2 - epsilon)` (the
        relu absorbs rounding), as Keras does.
    """
    stddev = stddev_from_variance(variance, epsilon)

    def folded(old_value, batch, rule_momentum, count=None):
        new = moving_averages.update_moving_statistic(old_value, batch, rule_momentum, count)
        return tf.where(valid, new, old_value)

    moving_stddev = folded(old.moving_stddev, stddev, momentum, num_batches)
    derived_variance = tf.nn.relu(moving_stddev * moving_stddev - epsilon)
    return RenormStatistics(
        moving_stddev=moving_stddev,
        moving_variance=tf.where(valid, derived_variance, old.moving_variance),
        renorm_mean=folded(old.renorm_mean, mean, renorm_momentum),
        renorm_stddev=folded(old.renorm_stddev, stddev, renorm_momentum),
    )
