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
  share a round: the number of rounds is the longest chain of BN layers.
* **At inference speed.** Functional and Sequential models (nested ones
  included) run in compiled rounds (`tfbn.tools.frontier_passes`): the
  data is read once, and each round resumes from the activations the
  previous one left behind, so every layer runs once per batch. Those
  activations are kept in memory up to `max_cache_bytes`; the batches past
  that are recomputed from the data in each round. Other models (subclassed ones, BN
  layers inside custom layers) run one eager pass over the data per level
  (`tfbn.tools.dataset_passes`; BN layers the graph cannot place are put
  after every BN layer called before them).
* **All or nothing.** Every batch is checked for NaN and infinity, and every
  layer's statistics before they are stored; a refusal (or any other error)
  restores every statistic of the model bit for bit.
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

import numpy as np

from tfbn.layers import introspection
from tfbn.tools import dataset_passes, frontier_passes, moment_pools, stored_statistics
from tfbn.tools.moment_pools import PopulationMoments

_LOG = logging.getLogger(__name__)


DEFAULT_MAX_CACHE_BYTES = 1 << 30
# Runs of at least this many equally shaped batches share one call per round
# (`frontier_passes.run_round_stacked`): its first call costs about as much
# as this many separate calls save.
_MIN_STACK = 32


def recompute_statistics(
    model,
    dataset,
    num_batches: int | None = None,
    progress: bool = True,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
) -> dict[str, PopulationMoments]:
    """Sets every BN layer's moving statistics to the dataset's population statistics.

    Functional and Sequential models (nested ones included) run in compiled
    rounds, one per BN dependency level, each resuming from the activations
    the previous round left behind (`tfbn.tools.frontier_passes`): every
    layer runs once per batch. The compiled rounds are kept with the model,
    so later calls skip the tracing. Other models (subclassed ones, BN
    layers inside custom layers) run one eager pass over the data per level.

    Nothing changes unless every statistic could be computed: non-finite
    inputs or statistics, a short dataset or any other error leave every
    statistic of the model bit-identical.

    Args:
        model: A Keras model containing tfbn and/or stock Keras BN layers
            (nested sub-models included).
        dataset: A re-iterable of batches, e.g. a batched `tf.data.Dataset`
            or a list of arrays. Each element is the model input, or a tuple
            `(x, y)` / `(x, y, sample_weight)` whose `x` is used (as in `fit`).
            A one-shot iterator is accepted only when one pass suffices. A
            dataset read more than once (batches past `max_cache_bytes`,
            models run in whole passes) must yield the same batches each
            time (e.g. no unseeded shuffle).
        num_batches: Use the first `num_batches` batches; None uses all of a
            finite dataset.
        progress: Show a progress bar counting batches.
        max_cache_bytes: Memory allowed for the activations kept between
            rounds, over all batches. The batches that do not fit have theirs
            recomputed from the data in each round instead (slower, same
            result; the dataset is then read once per round).

    Returns:
        A dict from BN layer path to the `PopulationMoments` it now holds.

    Raises:
        TypeError: For an unbatched array, a one-shot iterator when several
            passes are needed, or a `max_cache_bytes` that is not an int.
        ValueError: For a bad `num_batches` or `max_cache_bytes`, an infinite dataset without
            `num_batches`, an empty dataset, one shorter than `num_batches`,
            a batch holding NaN or infinity, or a layer whose statistics are
            not finite (all checked before any statistic is changed, or
            undone).
    """
    layers = introspection.batch_norm_layers(model)
    if not layers:
        raise ValueError(
            f"Model {model.name!r} has no BatchNormalization layer (tfbn or Keras); "
            "there are no statistics to recompute."
        )
    dataset_passes.check_dataset(dataset, num_batches)
    if isinstance(max_cache_bytes, bool) or not isinstance(max_cache_bytes, int):
        raise TypeError(f"`max_cache_bytes` must be an int; received {max_cache_bytes!r}.")
    if max_cache_bytes < 0:
        raise ValueError(
            f"`max_cache_bytes` must be >= 0 (0 keeps nothing); received {max_cache_bytes}."
        )
    saved = {
        id(layer): {name: v.numpy().copy() for name, v in _statistics(layer).items()}
        for layer in layers
    }
    try:
        plan = _plan_of(model)
        if plan is None:
            return _recompute_by_passes(model, dataset, layers, num_batches, progress)
        return _recompute_by_rounds(plan, dataset, num_batches, progress, max_cache_bytes)
    except BaseException:
        for layer in layers:  # All or nothing: undo the layers already assigned.
            for name, variable in _statistics(layer).items():
                if name in saved[id(layer)]:  # A layer built by the pass had no statistics.
                    variable.assign(saved[id(layer)][name])
        raise


def _statistics(layer) -> dict:
    return introspection.statistic_variables(layer) if layer.built else {}


def _plan_of(model):
    """The model's rounds, built (and traced) once per model."""
    cached = model.__dict__.get("_tfbn_population_plan")
    if cached is None:
        cached = (frontier_passes.build_plan(model, moment_pools.input_moments),)
        # Bypasses Keras attribute tracking: the plan is a cache, not state.
        model.__dict__["_tfbn_population_plan"] = cached
    return cached[0]


def _recompute_by_rounds(plan, dataset, num_batches, progress, max_cache_bytes):
    rounds = plan.rounds
    if iter(dataset) is dataset and len(rounds) > 1:
        raise TypeError(_one_shot_message(len(rounds)))
    bar = None
    if progress:
        print(f"recompute_statistics: {len(rounds)} rounds (BN dependency levels), in batches")
        bar = dataset_passes.progress_bar(dataset, num_batches)
    records: dict[int, list] = {}
    frontiers: list = []  # The first batches' frontiers, as many as the cache holds.
    cached = 0
    seen = 0
    for seen, inputs in enumerate(dataset_passes.model_inputs(dataset, num_batches), start=1):
        dataset_passes.check_finite_inputs(inputs, seen - 1)
        frontier, records[seen - 1] = frontier_passes.run_round(rounds[0], plan.bind(inputs))
        cached += _frontier_bytes(frontier)
        if cached <= max_cache_bytes and len(frontiers) == seen - 1:
            frontiers.append(frontier)
        _advance(bar, seen / len(rounds))
    _check_seen(seen, num_batches)
    if bar is not None:
        bar.target = bar.target or seen
    pools: dict[int, moment_pools.MomentPool] = {}
    results = _finalize(rounds[0], records, pools)
    entries = _cache_entries(frontiers, seen)
    del frontiers  # The entries hold the only copy.
    for index, one_round in enumerate(rounds[1:], start=1):
        entries, records = _run_cached(one_round, entries)
        replay = {entry.first for entry in entries if entry.frontier is None}
        for batch_index, frontier in _replayed(plan, dataset, num_batches, index, replay):
            _, records[batch_index] = frontier_passes.run_round(one_round, frontier)
        entries = _trim(entries, max_cache_bytes)
        _advance(bar, (index + 1) * seen / len(rounds))
        results.update(_finalize(one_round, records, pools))
    if bar is not None:
        bar.update(seen, finalize=True)
    return results


@dataclasses.dataclass
class _Entry:
    """Cached frontiers: one batch (`size` None), a stack of `size`, or none (replayed)."""

    first: int
    size: int | None
    frontier: dict | None


def _cache_entries(frontiers, seen) -> list[_Entry]:
    entries, first = [], 0
    for size, frontier in frontier_passes.stack_frontiers(frontiers, _MIN_STACK):
        entries.append(_Entry(first, size, frontier))
        first += size or 1
    entries += [_Entry(index, None, None) for index in range(first, seen)]
    return entries


def _run_cached(one_round, entries):
    """Runs a round on every cached entry; returns the new entries and records by batch."""
    kept, records = [], {}
    for entry in entries:
        if entry.frontier is None:
            kept.append(entry)
        elif entry.size is None:
            frontier, records[entry.first] = frontier_passes.run_round(one_round, entry.frontier)
            kept.append(_Entry(entry.first, None, frontier))
        else:
            frontier, stacked = frontier_passes.run_round_stacked(one_round, entry.frontier)
            arrays = [tuple(np.asarray(tensor) for tensor in record) for record in stacked]
            for offset in range(entry.size):
                records[entry.first + offset] = [
                    tuple(array[offset] for array in record) for record in arrays
                ]
            kept.append(_Entry(entry.first, entry.size, frontier))
    return kept, records


def _trim(entries, max_cache_bytes) -> list[_Entry]:
    """Drops the last cached entries until the cache fits; their batches are replayed."""
    sizes = [0 if e.frontier is None else _frontier_bytes(e.frontier) for e in entries]
    total = sum(sizes)
    for position in reversed(range(len(entries))):
        if total <= max_cache_bytes:
            break
        entry = entries[position]
        if entry.frontier is not None:
            total -= sizes[position]
            batches = range(entry.first, entry.first + (entry.size or 1))
            entries[position : position + 1] = [_Entry(index, None, None) for index in batches]
    return entries


def _replayed(plan, dataset, num_batches, index, wanted):
    """`(batch index, frontier before round index)` for the `wanted` batches, from the data."""
    if not wanted:
        return
    for batch_index, inputs in enumerate(dataset_passes.model_inputs(dataset, num_batches)):
        if batch_index not in wanted:
            continue
        frontier = plan.bind(inputs)
        for one_round in plan.rounds[:index]:
            frontier, _ = frontier_passes.run_round(one_round, frontier)
        yield batch_index, frontier


def _check_seen(seen, num_batches):
    if num_batches is not None and seen < num_batches:
        raise ValueError(
            f"`num_batches`={num_batches} but the dataset yielded only {seen} "
            "batches. Pass a smaller num_batches or more data."
        )
    if seen == 0:
        raise ValueError("The dataset yielded no batches; pass a non-empty dataset.")


def _one_shot_message(passes):
    return (
        f"The BN layers of this model form chains of {passes} layers, which need "
        "that many passes over the data, but `dataset` is a one-shot iterator. "
        "Pass a tf.data.Dataset or a list of batches."
    )


def _advance(bar, batches: float):
    """Moves the bar to `batches` batches' worth of the whole model's work."""
    if bar is not None:
        bar.update(batches)


def _frontier_bytes(frontier) -> int:
    total = 0
    for value, mask in frontier.values():
        for tensor in (value, mask):
            if tensor is not None:
                total += int(np.prod(tensor.shape)) * tensor.dtype.size  # Eager: known.
    return total


def _finalize(one_round, records, pools) -> dict[str, PopulationMoments]:
    """Pools the round's records in batch order and assigns the finished layers.

    `pools` outlives the round: a shared BN layer whose calls sit at different
    depths is recorded over several rounds and finished in the last one.
    """
    for batch_index in sorted(records):
        for step, (count, mean, variance) in zip(one_round.records, records[batch_index]):
            layer = step.operation
            if id(layer) not in pools:
                pools[id(layer)] = moment_pools.MomentPool(layer)
            pools[id(layer)].add(count, mean, variance, batch_index)
    results = {}
    for layer in one_round.finalized:
        results[layer.path] = pools.pop(id(layer)).result()
        _assign(layer, results[layer.path])
    return results


def _recompute_by_passes(model, dataset, layers, num_batches, progress):
    """One eager pass per dependency level, for models without a usable graph."""
    one_shot = iter(dataset) is dataset
    pools, order, seen = dataset_passes.collect(
        model, dataset, layers, num_batches, progress, "pass 1"
    )
    _check_seen(seen, num_batches)
    levels = dataset_passes.dependency_levels(model, order)
    if one_shot and len(levels) > 1:
        raise TypeError(_one_shot_message(len(levels)))
    for layer in layers:
        if id(layer) not in pools:
            _LOG.warning("BN layer %s was never called on the dataset; left unchanged.", layer.path)

    results = {}
    for index, level in enumerate(levels):
        if index > 0:
            pools, _, _ = dataset_passes.collect(
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
    dataset_passes.check_dataset(dataset, num_batches)
    layers = introspection.batch_norm_layers(model)
    pools, _, _ = dataset_passes.collect(
        model, dataset, layers, num_batches, progress, "statistics", refuse_non_finite=False
    )
    return {layer.path: pools[id(layer)].result() for layer in layers if id(layer) in pools}


def _assign(layer, moments: PopulationMoments):
    """Assigns every statistic of `layer` from `moments`, all or nothing."""
    state = stored_statistics.population_state(
        layer, moments.mean, moments.variance, moments.count, moments.num_calls
    )
    for name, value in state.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"BN layer {layer.path!r} would store a non-finite {name} (its input is "
                "too large for float32); no statistic was changed. Scale the data."
            )
    variables = introspection.statistic_variables(layer)
    for name, value in state.items():
        variables[name].assign(value)
