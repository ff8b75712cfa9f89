"""Uniform read access to tfbn and stock Keras BatchNormalization layers.

The tools, the trainer and the reports treat `tfbn.BatchNormalization` and
`keras.layers.BatchNormalization` alike. This module is the one place that
knows how to find either kind of layer in a model and read its feature axes,
variance convention, inference constants and statistic variables.
"""

from __future__ import annotations

import keras
import numpy as np

from tfbn.layers.batch_normalization import BatchNormalization as TfbnBatchNormalization
from tfbn.nn.batch_norm import STATISTIC_NAMES

BATCH_NORM_TYPES = (TfbnBatchNormalization, keras.layers.BatchNormalization)


def is_batch_norm(layer) -> bool:
    """Whether `layer` is a tfbn or stock Keras BatchNormalization layer."""
    return isinstance(layer, BATCH_NORM_TYPES)


def feature_axes(layer, rank: int) -> list[int]:
    """The layer's feature axes as sorted non-negative ints for inputs of `rank`."""
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    return sorted(axis % rank for axis in axes)


def variance_estimator(layer) -> str:
    """`"biased"` or `"unbiased"`: how the layer stores its moving variance.

    Stock Keras 3 layers store the biased (divide by n) batch variance.
    """
    return getattr(layer, "moving_variance_estimator", "biased")


def param_shape(layer) -> tuple[int, ...]:
    return tuple(layer.moving_mean.shape)


def inference_scale_shift(layer) -> tuple[np.ndarray, np.ndarray]:
    """The per-feature constants of inference mode, `y = x * a + b`, in float64.

    `a = gamma / sqrt(moving_variance + epsilon)` and
    `b = beta - moving_mean * a` (BN's inference transform precomputed once as a scale and a shift);
    a layer without `scale` has gamma 1, one without `center` has beta 0.
    Float64 keeps the folded constants as accurate as float32 allows.
    """
    if not layer.built:
        raise ValueError(
            f"BatchNormalization layer {layer.name!r} is not built, so it has no "
            "statistics yet. Call the model on data (or build it) first."
        )
    mean = np.asarray(layer.moving_mean.numpy(), np.float64)
    variance = np.asarray(layer.moving_variance.numpy(), np.float64)
    gamma = np.asarray(layer.gamma.numpy(), np.float64) if layer.scale else np.ones_like(mean)
    beta = np.asarray(layer.beta.numpy(), np.float64) if layer.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(variance + float(layer.epsilon))
    return scale, beta - mean * scale


def initial_moving_statistics(layer) -> tuple[np.ndarray, np.ndarray]:
    """What the layer's moving mean and variance were initialised to."""
    shape = param_shape(layer)
    mean = layer.moving_mean_initializer(shape, dtype="float32")
    variance = layer.moving_variance_initializer(shape, dtype="float32")
    return np.asarray(mean), np.asarray(variance)


def iter_layers(model) -> list[keras.layers.Layer]:
    """Every layer inside `model` (nested models and sublayers too), each once."""
    if not isinstance(model, keras.layers.Layer):
        return []  # A non-layer operation, e.g. `keras.ops.add`.
    return model._flatten_layers(include_self=False, recursive=True)


def batch_norm_layers(model) -> list[keras.layers.Layer]:
    """The BN layers of `model` (nested ones included), in layer order."""
    return [layer for layer in iter_layers(model) if is_batch_norm(layer)]


def statistic_variables(layer) -> dict[str, keras.Variable]:
    """Every moving statistic the layer keeps, by name, in `STATISTIC_NAMES` order.

    `moving_mean` and `moving_variance` always; with renorm (tfbn or stock)
    also `moving_stddev`, `renorm_mean` and `renorm_stddev`; with a
    cumulative average (`momentum=None`) also `num_batches_tracked`. This is
    what "the statistics stayed bit-identical" and "reset the statistics"
    refer to everywhere in tfbn.
    """
    found = {name: getattr(layer, name, None) for name in STATISTIC_NAMES}
    return {name: variable for name, variable in found.items() if variable is not None}


def state_variables(layer) -> dict[str, keras.Variable]:
    """`gamma` and `beta` (those the layer has), then `statistic_variables(layer)`."""
    affine = {name: getattr(layer, name, None) for name in ("gamma", "beta")}
    state = {name: variable for name, variable in affine.items() if variable is not None}
    state.update(statistic_variables(layer))
    return state
