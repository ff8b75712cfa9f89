"""Population statistics for BN layers: the paper's inference procedure.

After training, a BN layer's moving statistics are an exponential average
that lags behind the final weights (and, for short runs, is still warming
up). `recompute_statistics` replaces them with the statistics of each BN
layer's input over a dataset, with all weights frozen (Ioffe & Szegedy 2015,
Algorithm 2; fvcore's PreciseBN; torch's `swa_utils.update_bn`).

Choices, each deliberate:

* **Exact pooled statistics.** Per batch we take the mean and biased
  variance of the BN input, then pool them with batch-size weights:
  `mean = sum(n_b * mean_b) / N` and
  `var = sum(n_b * (var_b + (mean_b - mean)**2)) / N` (Chan's parallel
  update, in float64). This is the mean and variance of *all* values the
  layer saw, as if the dataset were one batch, including the spread between
  batch means that the paper's `m/(m-1) * E[var_b]` leaves out. Layers
  whose `moving_variance_estimator` is `"unbiased"` store `N/(N-1) * var`
  (the core's `tfbn.nn.moments.bessel_corrected`); stock Keras layers
  store the biased value.
* **Inference-consistent, layer after layer.** A BN layer's input depends on
  the inference-mode normalization of the BN layers before it. Each layer's
  statistics are therefore computed with every BN layer upstream of it
  already holding its *new* statistics, so after the call each layer's
  moving statistics are exactly the population statistics of its input in
  the returned inference model. Layers that do not depend on each other
  share a pass over the data: the number of passes is the longest chain of
  BN layers (found from the Functional graph; BN layers it cannot see, e.g.
  inside subclassed layers, are conservatively placed after every BN layer
  called before them).
* **Nothing else changes.** The model runs with `training=False`; only
  the statistics of `tfbn.layers.introspection.statistic_variables` are
  assigned, all of them consistently (see
  `tfbn.tools.stored_statistics.population_state`): the moving mean and
  variance; for renorm layers `moving_stddev = renorm_stddev =
  sqrt(variance + epsilon)` and `renorm_mean = mean`; for `momentum=None`
  layers `num_batches_tracked` = the number of batches pooled.
"""

from __future__ import annotations

import dataclasses
import logging

import keras
import numpy as np
import tensorflow as tf

from tfbn.layers import introspection
from tfbn.nn import moments as moments_lib
from tfbn.tools import model_graph, stored_statistics

_LOG = logging.getLogger(__name__)


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


class _Pool:
    """Chan et al.'s pairwise combination of (count, mean, sum of squares), float64."""

    def __init__(self, shape):
        self.count = np.zeros(shape)
        self.mean = np.zeros(shape)
        self.squares = np.zeros(shape)
        self.num_calls = 0

    def add(self, count, mean, variance):
        self.num_calls += 1
        total = self.count + count
        weight = np.divide(count, total, out=np.zeros_like(total), where=total > 0)
        delta = mean - self.mean
        self.squares = self.squares + count * variance + delta**2 * self.count * weight
        self.mean = self.mean + delta * weight
        self.count = total

    def result(self) -> PopulationMoments:
        variance = np.divide(
            self.squares, self.count, out=np.zeros_like(self.squares), where=self.count > 0
        )
        return PopulationMoments(self.mean, variance, self.count, self.num_calls)


def recompute_statistics(
    model, dataset, num_batches: int | None = None, progress: bool = True
) -> dict[str, PopulationMoments]:
    """Sets every BN layer's moving statistics to the dataset's population statistics.

    Args:
        model: A Keras model containing tfbn and/or stock Keras BN layers
            (nested sub-models included). Functional and Sequential models
            share passes between independent BN layers; subclassed models
            work too, with one pass per BN layer.
        dataset: A re-iterable of batches, e.g. a batched `tf.data.Dataset`
            or a list of arrays. Each element is the model input, or a tuple
            `(x, y)` / `(x, y, sample_weight)` whose `x` is used (as in `fit`).
            A one-shot iterator is accepted only when one pass suffices.
        num_batches: Use the first `num_batches` batches; None uses all of a
            finite dataset.
        progress: Show a progress bar per pass.

    Returns:
        A dict from BN layer path to the `PopulationMoments` it now holds.

    Raises:
        TypeError: For an unbatched array or a one-shot iterator when several
            passes are needed.
        ValueError: For a bad `num_batches`, an infinite dataset without
            `num_batches`, an empty dataset, or one shorter than `num_batches`
            (checked before any statistic is changed).
    """
    layers = introspection.batch_norm_layers(model)
    if not layers:
        raise ValueError(
            f"Model {model.name!r} has no BatchNormalization layer (tfbn or Keras); "
            "there are no statistics to recompute."
        )
    _check_dataset(dataset, num_batches)
    one_shot = iter(dataset) is dataset

    pools, order, seen = _collect(model, dataset, layers, num_batches, progress, "pass 1")
    if num_batches is not None and seen < num_batches:
        raise ValueError(
            f"`num_batches`={num_batches} but the dataset yielded only {seen} "
            "batches. Pass a smaller num_batches or more data."
        )
    if seen == 0:
        raise ValueError("The dataset yielded no batches; pass a non-empty dataset.")
    levels = _dependency_levels(model, order)
    if one_shot and len(levels) > 1:
        raise TypeError(
            f"The BN layers of {model.name!r} form chains of {len(levels)} layers, "
            "which need that many passes over the data, but `dataset` is a one-shot "
            "iterator. Pass a tf.data.Dataset or a list of batches."
        )
    for layer in layers:
        if id(layer) not in pools:
            _LOG.warning("BN layer %s was never called on the dataset; left unchanged.", layer.path)

    results = {}
    for index, level in enumerate(levels):
        if index > 0:
            pools, _, _ = _collect(
                model, dataset, level, num_batches, progress, f"pass {index + 1}/{len(levels)}"
            )
        for layer in level:
            results[layer.path] = pools[id(layer)].result()
            _assign(layer, results[layer.path])
    return results


def population_moments(
    model, dataset, num_batches: int | None = None, progress: bool = False
) -> dict[str, PopulationMoments]:
    """The pooled statistics of every BN layer's input in one inference pass.

    Unlike `recompute_statistics` this changes nothing: each layer's input is
    what the model, with its current statistics, feeds it.

    Args:
        model: A Keras model with BN layers (see `recompute_statistics`).
        dataset: A re-iterable of batches (see `recompute_statistics`).
        num_batches: Use the first `num_batches` batches; None uses all.
        progress: Show a progress bar.

    Returns:
        A dict from BN layer path to `PopulationMoments`, for the BN layers
        the dataset reached.

    Raises:
        TypeError: For an unbatched array.
        ValueError: For a bad `num_batches` or an infinite dataset without it.
    """
    _check_dataset(dataset, num_batches)
    layers = introspection.batch_norm_layers(model)
    pools, _, _ = _collect(model, dataset, layers, num_batches, progress, "statistics")
    return {layer.path: pools[id(layer)].result() for layer in layers if id(layer) in pools}


def _check_dataset(dataset, num_batches):
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


def _collect(model, dataset, layers, num_batches, progress, title):
    """Runs the model in inference mode and pools the inputs of `layers`.

    Returns:
        `(pools, order, batches)`: a dict from `id(layer)` to `_Pool`, the
        recorded layers in the order they were first called, and the number
        of batches run.
    """
    pools: dict[int, _Pool] = {}
    order: list = []
    originals = {}

    def recorder(layer, call):
        def recording_call(inputs, *args, **kwargs):
            _record(layer, inputs, kwargs.get("mask"), pools, order)
            return call(inputs, *args, **kwargs)

        return recording_call

    for layer in layers:
        originals[id(layer)] = layer.call
        layer.call = recorder(layer, layer.call)
    batches = 0
    bar = None
    if progress:
        print(f"recompute_statistics: {title}")
        bar = keras.utils.Progbar(_expected_batches(dataset, num_batches), unit_name="batch")
    try:
        for batch in dataset:
            if num_batches is not None and batches >= num_batches:
                break
            inputs, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
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


def _expected_batches(dataset, num_batches) -> int | None:
    """The progress bar's target: num_batches, else the dataset's length if known."""
    if isinstance(dataset, tf.data.Dataset):
        cardinality = int(dataset.cardinality())
        length = cardinality if cardinality >= 0 else None
    else:
        length = len(dataset) if hasattr(dataset, "__len__") else None
    if num_batches is None:
        return length
    return num_batches if length is None else min(num_batches, length)


def _record(layer, inputs, mask, pools, order):
    x = tf.convert_to_tensor(inputs)
    rank = x.shape.rank
    axes = introspection.feature_axes(layer, rank)
    if mask is not None:
        mask = tf.cast(mask, tf.float32)
        for axis in axes:
            mask = tf.expand_dims(mask, axis)
    reduction = [axis for axis in range(rank) if axis not in axes]
    stats = moments_lib.batch_moments(x, reduction, mask=mask)
    shape = introspection.param_shape(layer)
    if id(layer) not in pools:
        pools[id(layer)] = _Pool(shape)
        order.append(layer)
    count = np.asarray(stats.count.numpy(), np.float64)
    count = np.broadcast_to(count.reshape(shape) if count.ndim else count, shape)
    pools[id(layer)].add(
        count,
        np.asarray(stats.mean.numpy(), np.float64).reshape(shape),
        np.asarray(stats.variance.numpy(), np.float64).reshape(shape),
    )


def _assign(layer, moments: PopulationMoments):
    """Assigns every statistic of `layer` from `moments`, all or nothing."""
    state = stored_statistics.population_state(
        layer, moments.mean, moments.variance, moments.count, moments.num_calls
    )
    variables = introspection.statistic_variables(layer)
    for name, value in state.items():
        variables[name].assign(value)


def _dependency_levels(model, order) -> list[list]:
    """Groups the called BN layers into passes: each layer after all its upstream BN."""
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
