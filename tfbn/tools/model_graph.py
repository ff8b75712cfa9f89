"""Where BN layers sit in a Functional or Sequential graph, and what they can fold into.

Folding, population statistics and the audit walk the model graph: which
layer produces a BN layer's input, whether that producer can absorb the BN's
affine map, and in which order the BN layers depend on one another.
"""

from __future__ import annotations

import dataclasses

import keras

from tfbn.layers.introspection import feature_axes, is_batch_norm

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


def foldable_kernel_name(layer) -> str | None:
    """The kernel attribute a following BN folds into.

    Args:
        layer: Any layer.

    Returns:
        The attribute name (e.g. `"kernel"`), or None if `layer` cannot absorb
        a BN.
    """
    for layer_type, kernel_name in _FOLDABLE_KERNELS:
        if isinstance(layer, layer_type):
            return kernel_name
    return None


def channel_axis(layer, rank: int) -> int:
    """The output-channel axis of a Conv/Dense layer's output.

    Args:
        layer: A Conv or Dense layer.
        rank: The rank of its output.

    Returns:
        1 for `channels_first`, else the last axis.
    """
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return 1
    return rank - 1


def graph_of(model):
    """The Functional graph behind `model` (a Sequential's inner Functional).

    Args:
        model: A Keras model.

    Returns:
        `model` itself for a Functional model, the inner Functional of a
        Sequential one.

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


def graph_nodes(graph) -> list:
    """The graph's call nodes in topological order.

    Args:
        graph: A Functional model (see `graph_of`).

    Returns:
        Its nodes, input nodes excluded, producers before consumers.
    """
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
        fold_blocker_code: A stable key of `FOLD_BLOCKER_CODES` for
            `fold_blocker` (to group by), or None when the BN can be folded.
        training_argument: The literal `training=` the call was built with
            (True/False), or None when it was left to the call context.
    """

    batch_norm: keras.layers.Layer
    node: object
    producer: keras.layers.Layer | None
    fold_blocker: str | None
    training_argument: bool | None
    fold_blocker_code: str | None = None


def batch_norm_sites(model, recursive: bool = False) -> list[BatchNormSite]:
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
    calls: dict[int, int] = {}
    consumers: dict[int, int] = {}
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
        code, reason = blocker if blocker is not None else (None, None)
        training = node.arguments.kwargs.get("training")
        sites.append(
            BatchNormSite(
                batch_norm=layer,
                node=node,
                producer=producer,
                fold_blocker=reason,
                training_argument=training if isinstance(training, bool) else None,
                fold_blocker_code=code,
            )
        )
    return sites


# Why a BN call cannot be folded: stable codes (to group and count by) and
# what each means. `BatchNormSite.fold_blocker` adds the layer-specific detail.
FOLD_BLOCKER_CODES = {
    "shared_batch_norm": "the BN layer is called more than once",
    "masked_input": "the BN call takes a mask",
    "no_producer_layer": "the BN input is a model input or a non-layer operation",
    "unfoldable_producer": f"the producer is not a {FOLDABLE_TYPE_NAMES} layer",
    "shared_producer": "the producer layer is called more than once",
    "producer_output_reused": "the producer's output also feeds other layers or the output",
    "producer_activation": "the producer applies a non-linear activation before the BN",
    "axis_mismatch": "the BN axes are not the producer's channel axis",
}


def _fold_blocker(bn, tensor, producer, calls, consumers, num_inputs) -> tuple[str, str] | None:
    """`(code, reason)` for a BN call that cannot be folded, None when it can."""
    if calls[id(bn)] > 1:
        return "shared_batch_norm", f"the BN layer is shared (called {calls[id(bn)]} times)"
    if num_inputs > 1:
        return "masked_input", "the BN call takes a mask, which a folded kernel cannot honour"
    if producer is None:
        return (
            "no_producer_layer",
            "its input is not produced by a layer (a model input or an operation)",
        )
    if foldable_kernel_name(producer) is None:
        return "unfoldable_producer", (
            f"its producer {producer.name!r} is a {type(producer).__name__}, not a "
            f"{FOLDABLE_TYPE_NAMES} layer"
        )
    if calls[id(producer)] > 1:
        return "shared_producer", (
            f"its producer {producer.name!r} is shared (called {calls[id(producer)]} times)"
        )
    if consumers[id(tensor)] > 1:
        return "producer_output_reused", (
            f"the output of {producer.name!r} also feeds other layers or is a model output"
        )
    if producer.activation is not keras.activations.linear:
        name = keras.activations.serialize(producer.activation)
        return "producer_activation", (
            f"its producer {producer.name!r} applies the activation {name!r} before "
            "the BN, so the BN's affine map cannot move into the kernel"
        )
    rank = len(tensor.shape)
    axes = feature_axes(bn, rank)
    expected = channel_axis(producer, rank)
    if axes != [expected]:
        return "axis_mismatch", (
            f"the BN normalizes axes {axes} but {producer.name!r} has its channels "
            f"on axis {expected}"
        )
    return None
