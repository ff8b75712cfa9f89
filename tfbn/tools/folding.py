"""Folds BN layers into the Conv/Dense layer before them, for inference.

In inference mode a BN layer is the per-channel affine map `y = x * a + b`
with `a = gamma / sqrt(moving_variance + epsilon)` and
`b = beta - moving_mean * a`. When `x = conv(z) = W * z + c` comes straight
from a linear Conv/Dense layer, the two compose into one layer with kernel
`W * a` (scaled along the output channels) and bias `c * a + b`. A BN that
cannot be folded (no such producer, an activation in between, a producer
whose output feeds other layers too, shared layers, multi-axis BN) becomes a
`ChannelAffine` layer with the same constants. Either way the folded model
computes the original model's inference outputs. The constants come from
`tfbn.layers.introspection.inference_scale_shift`, the one place they are
computed for both kinds of BN layer.
"""

from __future__ import annotations

import dataclasses
import logging

import keras
import numpy as np
import tensorflow as tf

from tfbn.layers import introspection
from tfbn.tools import model_graph

_LOG = logging.getLogger(__name__)


@keras.saving.register_keras_serializable(package="tfbn")
class ChannelAffine(keras.layers.Layer):
    """Per-feature `y = x * scale + offset`: a BN layer frozen in inference mode.

    Args:
        axis: Feature axis or list of axes, as in BatchNormalization.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).
    """

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis if isinstance(axis, int) else list(axis)
        self.supports_masking = True

    def build(self, input_shape):
        rank = len(input_shape)
        self._feature_axes = introspection.feature_axes(self, rank)
        shape = tuple(int(input_shape[axis]) for axis in self._feature_axes)
        self._broadcast_shape = [1] * rank
        for axis, size in zip(self._feature_axes, shape):
            self._broadcast_shape[axis] = size
        self.scale = self.add_weight(
            shape=shape, name="scale", initializer="ones", trainable=False, dtype="float32"
        )
        self.offset = self.add_weight(
            shape=shape, name="offset", initializer="zeros", trainable=False, dtype="float32"
        )

    def call(self, inputs):
        # float32 like BN, so a folded float16 model keeps BN's accuracy.
        x = tf.cast(inputs, tf.float32)
        scale = tf.reshape(self.scale.value, self._broadcast_shape)
        offset = tf.reshape(self.offset.value, self._broadcast_shape)
        return tf.cast(x * scale + offset, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["axis"] = self.axis
        return config


@dataclasses.dataclass(frozen=True)
class FoldDecision:
    """What became of one BN layer.

    Attributes:
        batch_norm: Path of the BN layer in the original model.
        folded_into: Name of the layer that absorbed it, or None.
        reason: Why it was not folded (it became a `ChannelAffine`), or None.
        reason_code: A stable code for `reason`, to group decisions by (a key
            of `tfbn.tools.model_graph.FOLD_BLOCKER_CODES`), or None.
    """

    batch_norm: str
    folded_into: str | None
    reason: str | None
    reason_code: str | None = None


def fold_batch_norm(model, return_report: bool = False):
    """Returns a new inference model with every foldable BN folded away.

    Every BN (tfbn or stock Keras) whose input comes straight from a linear
    Conv1D/2D/3D, DepthwiseConv1D/2D, SeparableConv1D/2D (its pointwise
    kernel) or Dense layer is folded into that layer's kernel and bias; a
    bias is created when the producer has `use_bias=False`. Every other BN
    becomes a `ChannelAffine` layer; each such case is logged (and reported)
    with the reason. Nested Functional/Sequential sub-models are folded too.
    Other layers are cloned with their weights, so the result shares no
    variable with `model`.

    The folded model only reproduces *inference* outputs (`training=False`);
    it is meant for export, not for training.

    Args:
        model: A built Functional or Sequential Keras model.
        return_report: If True, also return the list of `FoldDecision`.

    Returns:
        The folded model (a Sequential for a Sequential input), or
        `(model, decisions)` when `return_report` is True.

    Raises:
        TypeError: For a subclassed model.
        ValueError: For an unbuilt Sequential model, or a BN layer whose
            statistics, scale or offset are NaN or infinite or whose moving
            variance is negative (checked before anything is built).
    """
    for layer in introspection.batch_norm_layers(model):
        _check_statistics(layer)
    decisions: list[FoldDecision] = []
    folded = _fold(model, decisions)
    for decision in decisions:
        if decision.reason is not None:
            _LOG.info(
                "BN %s not folded [%s]: %s",
                decision.batch_norm,
                decision.reason_code,
                decision.reason,
            )
    return (folded, decisions) if return_report else folded


def fold_reason_counts(decisions) -> dict[str, int]:
    """How many BN layers were kept as `ChannelAffine`, by reason code.

    Args:
        decisions: The report of `fold_batch_norm(..., return_report=True)`.

    Returns:
        Reason code -> count, most frequent first.
    """
    counts: dict[str, int] = {}
    for decision in decisions:
        if decision.reason_code is not None:
            counts[decision.reason_code] = counts.get(decision.reason_code, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _check_statistics(layer):
    """Refuses statistics that would fold into NaN or infinite weights."""
    if not layer.built:
        return  # inference_scale_shift names the unbuilt layer.
    for name in ("moving_mean", "moving_variance", "gamma", "beta"):
        variable = getattr(layer, name, None)
        if variable is None:
            continue
        value = np.asarray(variable.numpy(), np.float64)
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"BN layer {layer.path!r} has NaN or infinite values in its {name}; "
                "folding would write them into the weights. Recompute its statistics "
                "(tfbn.tools.population_statistics) or restore a good checkpoint first."
            )
    variance = np.asarray(layer.moving_variance.numpy(), np.float64)
    if np.any(variance < 0):
        raise ValueError(
            f"BN layer {layer.path!r} has a negative moving_variance "
            f"(minimum {variance.min():.3g}); folding would produce NaN weights. "
            "Recompute its statistics or restore a good checkpoint first."
        )


def _fold(model, decisions):
    graph = model_graph.graph_of(model)
    sites = model_graph.batch_norm_sites(model)
    replacements = {}  # id(original operation) -> callable in the new graph
    weight_copies = []  # (original, clone) pairs, weights copied once built
    for site in sites:
        bn = site.batch_norm
        if site.fold_blocker is None:
            replacements[id(site.producer)] = _folded_producer(site.producer, bn)
            replacements[id(bn)] = _pass_through
            decisions.append(FoldDecision(bn.path, site.producer.name, None))
        elif id(bn) not in replacements:
            replacements[id(bn)] = _affine_replacement(bn, site.node.input_tensors[0])
            decisions.append(FoldDecision(bn.path, None, site.fold_blocker, site.fold_blocker_code))

    def operation_fn(operation):
        key = id(operation)
        if key not in replacements:
            replacements[key] = _clone(operation, decisions, weight_copies)
        return replacements[key]

    inputs = keras.tree.map_structure(
        lambda x: keras.Input(
            batch_shape=x.shape, dtype=x.dtype, name=x._keras_history.operation.name
        ),
        graph.input,
    )
    outputs = graph._run_through_graph(inputs, operation_fn=operation_fn)
    folded = keras.Model(inputs, outputs, name=model.name)
    for original, clone in weight_copies:
        clone.set_weights(original.get_weights())
    if isinstance(model, keras.Sequential):
        layers = [
            layer for layer in folded.layers if not isinstance(layer, keras.layers.InputLayer)
        ]
        return keras.Sequential([inputs] + layers, name=model.name)
    return folded


def _pass_through(inputs, *args, **kwargs):
    del args, kwargs  # A folded BN's training/mask arguments no longer apply.
    return inputs


def _clone(operation, decisions, weight_copies):
    if isinstance(operation, keras.Model):
        return _fold(operation, decisions)
    if not isinstance(operation, keras.layers.Layer) or not operation.weights:
        # Stateless: sharing the instance shares nothing that can change.
        return operation
    clone = operation.__class__.from_config(operation.get_config())
    weight_copies.append((operation, clone))
    return clone


def _folded_producer(producer, bn):
    """A copy of `producer` with `bn`'s inference map folded into it."""
    scale, shift = introspection.inference_scale_shift(bn)
    kernel_name = model_graph.foldable_kernel_name(producer)
    kernel = np.asarray(getattr(producer, kernel_name).numpy(), np.float64)
    if isinstance(producer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        # Output channel c = input channel i * depth_multiplier + m, and the
        # kernel is (..., in_channels, depth_multiplier).
        channel_scale = scale.reshape(kernel.shape[-2:])
    else:
        channel_scale = scale
    folded_kernel = kernel * channel_scale
    bias = np.asarray(producer.bias.numpy(), np.float64) if producer.use_bias else 0.0
    folded_bias = bias * scale + shift

    config = producer.get_config()
    config["use_bias"] = True
    clone = producer.__class__.from_config(config)
    clone.build(producer.input.shape)
    for weight, original in zip(clone.weights, producer.weights):
        weight.assign(original)  # The depthwise kernel of a separable conv.
    getattr(clone, kernel_name).assign(folded_kernel.astype(np.float32))
    clone.bias.assign(np.broadcast_to(folded_bias, clone.bias.shape).astype(np.float32))
    return clone


def _affine_replacement(bn, input_tensor):
    affine = ChannelAffine(axis=bn.axis, name=bn.name)
    affine.build(input_tensor.shape)
    scale, shift = introspection.inference_scale_shift(bn)
    affine.scale.assign(scale.astype(np.float32))
    affine.offset.assign(shift.astype(np.float32))

    def call(inputs, *args, **kwargs):
        del args, kwargs  # BN's `training`; the affine map has no modes.
        return affine(inputs)

    return call
