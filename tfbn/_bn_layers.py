"""Uniform access to tfbn and stock Keras BN layers, and to where they sit in a graph.

The inference tools (folding, population statistics, conversion, audit) treat
`tfbn.BatchNormalization` and `keras.layers.BatchNormalization` alike. This
private module is the one place that knows how to read either layer's feature
axes, inference constants and variance convention, and how to find the layer
that produces a BN layer's input in a Functional or Sequential model.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import keras
import numpy as np

from tfbn.layers.batch_normalization import BatchNormalization as TfbnBatchNormalization

BATCH_NORM_TYPES = (TfbnBatchNormalization, keras.layers.BatchNormalization)

# Layers whose kernel and bias can absorb a following BN, with the attribute
# holding the kernel whose last axis indexes the output channels.
_FOLDABLE_KERNELS = (
    (keras.layers.SeparableConv1D, "pointwise_kernel"),
    (keras.layers.SeparableConv2D, "pointwise_kernel"),
    (keras.layers.DepthwiseConv1D, "kernel"),
    (keras.layers.DepthwiseConv2D, "kernel"),
    (keras.layers.Conv1D, "kernel"),
    (keras.layers.Conv2D, "kernel"),
    (keras.layers.Conv3D, "kernel"),
    (keras.layers.Dense, "kernel"),
)
FOLDABLE_TYPE_NAMES = "Conv1D/2D/3D, DepthwiseConv1D/2D, SeparableConv1D/2D or Dense"


def is_batch_norm(layer) -> bool:
    """Whether `layer` is a tfbn or stock Keras BatchNormalization layer."""
    return isinstance(layer, BATCH_NORM_TYPES)


def feature_axes(layer, rank: int) -> List[int]:
    """The layer's feature axes as sorted non-negative ints for inputs of `rank`."""
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    return sorted(axis % rank for axis in axes)


def variance_estimator(layer) -> str:
    """`"biased"` or `"unbiased"`: how the layer stores its moving variance.

    Stock Keras 3 layers store the biased (divide by n) batch variance.
    """
    return getattr(layer, "moving_variance_estimator", "biased")


def param_shape(layer) -> Tuple[int, ...]:
    return tuple(layer.moving_mean.shape)


def inference_scale_shift(layer) -> Tuple[np.ndarray, np.ndarray]:
    """The per-feature constants of inference mode, `y = x * a + b`, in float64.

    `a = gamma / sqrt(moving_variance + epsilon)` and
    `b = beta - moving_mean * a` (seed 000's precomputed scale and shift);
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


def initial_moving_statistics(layer) -> Tuple[np.ndarray, np.ndarray]:
    """What the layer's moving mean and variance were initialised to."""
    shape = param_shape(layer)
    mean = layer.moving_mean_initializer(shape, dtype="float32")
    variance = layer.moving_variance_initializer(shape, dtype="float32")
    return np.asarray(mean), np.asarray(variance)


def iter_layers(model) -> List[keras.layers.Layer]:
    """Every layer inside `model` (nested models and sublayers too), each once."""
    if not isinstance(model, keras.layers.Layer):
        return []  # A non-layer operation, e.g. `keras.ops.add`.
    return model._flatten_layers(include_self=False, recursive=True)


def batch_norm_layers(model) -> List[keras.layers.Layer]:
    """The BN layers of `model` (nested ones included), in layer order."""
    return [layer for layer in iter_layers(model) if is_batch_norm(layer)]


def foldable_kernel_name(layer) -> Optional[str]:
    """The kernel attribute a following BN folds into, or None if not foldable."""
    for layer_type, kernel_name in _FOLDABLE_KERNELS:
        if isinstance(layer, layer_type):
            return kernel_name
    return None


def channel_axis(layer, rank: int) -> int:
    """The output-channel axis of a Conv/Dense layer's output of `rank`."""
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return 1
    return rank - 1


def graph_of(model):
    """The Functional graph behind `model` (a Sequential's inner Functional).

    Raises:
        TypeError: For a subclassed model, which has no graph to rewrite.
        ValueError: For a Sequential model that was never built.
    """
    if isinstance(model, keras.Sequential):
        graph = getattr(model, "_functional", None)
        if graph is None:
            raise ValueError(
                f"Sequential model {model.name!r} has no known input shape. "
                "Start it with keras.Input(shape) or build it first."
            )
        return graph
    if not hasattr(model, "_nodes_by_depth") or not hasattr(model, "_run_through_graph"):
        raise TypeError(
            f"Expected a Functional or Sequential Keras model; received "
            f"{type(model).__name__}. Subclassed models have no layer graph to "
            "inspect; rebuild the network with the Functional API."
        )
    return model


def graph_nodes(graph) -> List:
    """The graph's call nodes (input nodes excluded) in topological order."""
    nodes = []
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        nodes.extend(
            node
            for node in graph._nodes_by_depth[depth]
            if node.operation is not None and not node.is_input
        )
    return nodes


@dataclasses.dataclass(frozen=True)
class BatchNormSite:
    """One call of a BN layer in a graph, and whether it can be folded.

    Attributes:
        batch_norm: The BN layer.
        node: Its call node in `graph`.
        producer: The layer whose output the BN reads, or None (a model input
            or a non-layer operation).
        fold_blocker: Why the BN cannot be folded into `producer`, or None when
            it can.
        training_argument: The literal `training=` the call was built with
            (True/False), or None when it was left to the call context.
    """

    batch_norm: keras.layers.Layer
    node: object
    producer: Optional[keras.layers.Layer]
    fold_blocker: Optional[str]
    training_argument: Optional[bool]


def batch_norm_sites(model, recursive: bool = False) -> List[BatchNormSite]:
    """Finds every BN call in the model graph and decides if it is foldable.

    A BN call folds into its producer only if the producer is a
    Conv/Depthwise/Separable/Dense layer called once, with a linear
    activation, whose output feeds nothing but this BN, and the BN is a
    single-axis BN on the producer's channel axis that is itself called once.

    Args:
        model: A Functional or Sequential model.
        recursive: Also report the sites inside nested Functional/Sequential
            sub-models.

    Returns:
        A list of `BatchNormSite` in topological order.
    """
    graph = graph_of(model)
    nodes = graph_nodes(graph)
    calls: Dict[int, int] = {}
    consumers: Dict[int, int] = {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for tensor in node.input_tensors:
            consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    for tensor in graph.outputs:
        consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1

    sites = []
    for node in nodes:
        layer = node.operation
        if recursive and isinstance(layer, keras.Model):
            sites.extend(batch_norm_sites(layer, recursive=True))
        if not is_batch_norm(layer):
            continue
        tensor = node.input_tensors[0]
        producer = tensor._keras_history.operation
        if isinstance(producer, keras.layers.InputLayer) or not isinstance(
            producer, keras.layers.Layer
        ):
            producer = None
        blocker = _fold_blocker(layer, tensor, producer, calls, consumers, len(node.input_tensors))
        training = node.arguments.kwargs.get("training")
        sites.append(
            BatchNormSite(
                batch_norm=layer,
                node=node,
                producer=producer,
                fold_blocker=blocker,
                training_argument=training if isinstance(training, bool) else None,
            )
        )
    return sites


def _fold_blocker(bn, tensor, producer, calls, consumers, num_inputs) -> Optional[str]:
    if calls[id(bn)] > 1:
        return f"the BN layer is shared (called {calls[id(bn)]} times)"
    if num_inputs > 1:
        return "the BN call takes a mask, which a folded kernel cannot honour"
    if producer is None:
        return "its input is not produced by a layer (a model input or an operation)"
    if foldable_kernel_name(producer) is None:
        return (
            f"its producer {producer.name!r} is a {type(producer).__name__}, not a "
            f"{FOLDABLE_TYPE_NAMES} layer"
        )
    if calls[id(producer)] > 1:
        return f"its producer {producer.name!r} is shared (called {calls[id(producer)]} times)"
    if consumers[id(tensor)] > 1:
        return f"the output of {producer.name!r} also feeds other layers or is a model output"
    if producer.activation is not keras.activations.linear:
        name = keras.activations.serialize(producer.activation)
        return (
            f"its producer {producer.name!r} applies the activation {name!r} before "
            "the BN, so the BN's affine map cannot move into the kernel"
        )
    rank = len(tensor.shape)
    axes = feature_axes(bn, rank)
    expected = channel_axis(producer, rank)
    if axes != [expected]:
        return (
            f"the BN normalizes axes {axes} but {producer.name!r} has its channels "
            f"on axis {expected}"
        )
    return None
