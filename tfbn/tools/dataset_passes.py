"""Passes over a dataset: reading and checking batches, and whole-model passes.

`tfbn.tools.population_statistics` reads batches through `model_inputs`, after
`check_dataset`, and refuses non-finite inputs with `check_finite_inputs`.
`collect` is its eager whole-model pass, used where a model's graph cannot
be split into rounds (`tfbn.tools.frontier_passes`): it records every BN
layer's input by wrapping the layer's `call`, and `dependency_levels` says
how many such passes the layer-after-layer statistics need.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfbn.layers import introspection
from tfbn.tools import model_graph, moment_pools


def check_dataset(dataset, num_batches) -> None:
    """Refuses an unbatched array, a bad `num_batches` or an endless dataset.

    Args:
        dataset: What the caller passed as batches.
        num_batches: The number of batches to use, or None for all.

    Raises:
        TypeError: For one array instead of batches.
        ValueError: For a bad `num_batches`, or an infinite dataset without it.
    """
    if isinstance(dataset, (np.ndarray, tf.Tensor)):
        raise TypeError(
            "`dataset` must yield batches; received one array of shape "
            f"{tuple(dataset.shape)}. Batch it, e.g. "
            "tf.data.Dataset.from_tensor_slices(x).batch(32)."
        )
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"`num_batches` must be a positive int or None; received {num_batches!r}.")
    if (
        num_batches is None
        and isinstance(dataset, tf.data.Dataset)
        and dataset.cardinality() == tf.data.INFINITE_CARDINALITY
    ):
        raise ValueError(
            "`dataset` is infinite (e.g. it calls .repeat()); pass num_batches "
            "to say how many batches to use."
        )


def model_inputs(dataset, num_batches):
    """Yields the model inputs of the first `num_batches` batches (None: all).

    An element is the model input, or `(x, y)` / `(x, y, sample_weight)`
    whose `x` is used (as in `fit`).
    """
    for index, batch in enumerate(dataset):
        if num_batches is not None and index >= num_batches:
            return
        yield keras.utils.unpack_x_y_sample_weight(batch)[0]


def check_finite_inputs(inputs, index: int) -> None:
    """Raises ValueError, naming batch `index`, if a float input holds NaN or infinity."""
    for tensor in tf.nest.flatten(inputs):
        tensor = tf.convert_to_tensor(tensor)
        if tensor.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(tensor))):
            raise ValueError(
                f"Batch {index} (counting from 0) of `dataset` holds NaN or infinite "
                "values; no statistic was changed. Clean or drop that batch."
            )


def expected_batches(dataset, num_batches) -> int | None:
    """The progress bar's target: num_batches, else the dataset's length if known."""
    if isinstance(dataset, tf.data.Dataset):
        cardinality = int(dataset.cardinality())
        length = cardinality if cardinality >= 0 else None
    else:
        length = len(dataset) if hasattr(dataset, "__len__") else None
    if num_batches is None:
        return length
    return num_batches if length is None else min(num_batches, length)


def progress_bar(dataset, num_batches) -> keras.utils.Progbar:
    """A bar counting batches, with `expected_batches` as its target (None: open-ended)."""
    return keras.utils.Progbar(expected_batches(dataset, num_batches), unit_name="batch")


def collect(model, dataset, layers, num_batches, progress, title, refuse_non_finite=True):
    """Runs the model eagerly in inference mode and pools the inputs of `layers`.

    Each BN layer's `call` is wrapped for the pass, so this sees BN layers
    anywhere, even inside subclassed layers.

    Args:
        model: The Keras model.
        dataset: A re-iterable of batches (see `model_inputs`).
        layers: The BN layers to record.
        num_batches: Use the first `num_batches` batches; None uses all.
        progress: Show a progress bar titled `title`.
        title: The bar's title.
        refuse_non_finite: Raise for a batch holding NaN or infinity, or a
            layer input whose statistics are not finite.

    Returns:
        `(pools, order, batches)`: a dict from `id(layer)` to
        `moment_pools.MomentPool`, the recorded layers in the order they were
        first called, and the number of batches run.
    """
    pools: dict[int, moment_pools.MomentPool] = {}
    order: list = []

    def recorder(layer, call):
        def recording_call(inputs, *args, **kwargs):
            count, mean, variance = moment_pools.input_moments(layer, inputs, kwargs.get("mask"))
            if id(layer) not in pools:
                pools[id(layer)] = moment_pools.MomentPool(layer, refuse_non_finite)
                order.append(layer)
            pools[id(layer)].add(count, mean, variance, batches)
            return call(inputs, *args, **kwargs)

        return recording_call

    for layer in layers:
        layer.call = recorder(layer, layer.call)
    batches = 0
    bar = None
    if progress:
        print(f"recompute_statistics: {title}")
        bar = progress_bar(dataset, num_batches)
    try:
        for batch in dataset:
            if num_batches is not None and batches >= num_batches:
                break
            inputs, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
            if refuse_non_finite:
                check_finite_inputs(inputs, batches)
            model(inputs, training=False)
            batches += 1
            if bar is not None:
                bar.update(batches)
        if bar is not None and bar.target is None:
            bar.update(batches, finalize=True)  # Ends the open-ended bar's line.
    finally:
        for layer in layers:
            # Removing the instance attribute restores the class's `call`.
            del layer.call
    return pools, order, batches


def dependency_levels(model, order) -> list[list]:
    """Groups the called BN layers into passes: each layer after all its upstream BN.

    The order comes from the Functional graph; BN layers it cannot see (e.g.
    inside subclassed layers) are placed after every BN layer called before
    them.

    Args:
        model: The Keras model.
        order: The BN layers in the order a pass first called them.

    Returns:
        Lists of layers; those of one list do not depend on each other.
    """
    upstream = _upstream_batch_norms(model)
    level_of: dict[int, int] = {}
    for position, layer in enumerate(order):
        deps = upstream.get(id(layer))
        if deps is None:
            earlier = [id(previous) for previous in order[:position]]
        else:
            earlier = [dep for dep in deps if dep in level_of]
        level_of[id(layer)] = 1 + max((level_of[dep] for dep in earlier), default=0)
    levels: list[list] = [[] for _ in range(max(level_of.values()))]
    for layer in order:
        levels[level_of[id(layer)] - 1].append(layer)
    return levels


def _upstream_batch_norms(model) -> dict[int, set | None]:
    """For each BN layer id, the ids of BN layers its input depends on.

    None marks a layer whose dependencies the graph does not show.
    """
    upstream: dict[int, set | None] = {}
    try:
        graph = model_graph.graph_of(model)
    except (TypeError, ValueError):
        return upstream
    _propagate(graph, [set() for _ in graph.inputs], upstream)
    return upstream


def _propagate(graph, input_reach, upstream) -> set:
    reach = {id(tensor): deps for tensor, deps in zip(graph.inputs, input_reach)}
    for node in model_graph.graph_nodes(graph):
        incoming = set().union(*(reach.get(id(t), set()) for t in node.input_tensors))
        operation = node.operation
        if introspection.is_batch_norm(operation):
            known = upstream.get(id(operation), set())
            upstream[id(operation)] = None if known is None else known | incoming
            produced = incoming | {id(operation)}
        else:
            produced = incoming | _propagate_into(operation, incoming, upstream)
        for tensor in node.outputs:
            reach[id(tensor)] = produced
    return set().union(*(reach.get(id(t), set()) for t in graph.outputs))


def _propagate_into(operation, incoming, upstream) -> set:
    """The BN layers inside a non-BN operation, recording their dependencies."""
    if isinstance(operation, keras.Model):
        try:
            graph = model_graph.graph_of(operation)
        except (TypeError, ValueError):
            graph = None
        if graph is not None:
            # Conservative: every inner input depends on all outer inputs.
            return _propagate(graph, [incoming for _ in graph.inputs], upstream)
    hidden = introspection.batch_norm_layers(operation)
    for layer in hidden:
        upstream[id(layer)] = None
    return {id(layer) for layer in hidden}
