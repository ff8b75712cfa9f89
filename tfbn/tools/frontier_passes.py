"""Runs a Functional model in rounds, one round per BN dependency level.

`tfbn.tools.population_statistics` needs the input of every BN layer under
the *new* statistics of the BN layers before it. Running the whole model once
per dependency level recomputes the network's prefix again and again (a
ResNet50 has about 50 levels). This module instead splits the model's graph
into rounds:

* round `r` computes every layer whose inputs are known and that does not
  depend on a BN layer whose statistics are not final yet, and records the
  input of the BN layers that became computable;
* after the caller has pooled those inputs over all batches and assigned
  the new statistics, round `r + 1` resumes from the activations round `r`
  left behind (the *frontier*: the values still needed by later rounds).

Every layer thus runs once per batch, in compiled rounds (`tf.function`),
and every recorded BN input is exactly what the whole model, called in
inference mode after the earlier rounds' assignments, would feed that layer.

The caller keeps each batch's frontier in memory, or rebuilds it from the
data by replaying the earlier (compiled) rounds when memory is short. Long
runs of equally shaped batches can be stacked and run through a round in
one call (`run_round_stacked`, a `tf.map_fn` over the per-batch round), which
gives each batch exactly what `run_round` computes at a lower cost per batch.

Nested Functional and Sequential models are flattened into the outer graph.
`build_plan` returns None for models it cannot split exactly: subclassed
models, BN layers hidden inside other layers, or a BN layer whose own output
feeds another of its calls.
"""

from __future__ import annotations

import dataclasses
import inspect

import keras
import tensorflow as tf
from keras.src.backend.common import masking

from tfbn.layers import introspection
from tfbn.tools import model_graph


class _Unsupported(Exception):
    """The model cannot be split into rounds; the caller runs whole passes."""


@dataclasses.dataclass(frozen=True)
class Step:
    """One layer call of the flattened graph.

    Attributes:
        node: The Keras call node.
        input_keys: Keys of the values behind `node.input_tensors`.
        output_keys: Keys of the values behind `node.outputs`.
    """

    node: object
    input_keys: tuple[int, ...]
    output_keys: tuple[int, ...]

    @property
    def operation(self):
        return self.node.operation


@dataclasses.dataclass
class Round:
    """What one compiled round reads, computes, records and leaves behind.

    Attributes:
        inputs: Frontier keys the round reads.
        steps: Layer calls it computes, in topological order.
        records: BN calls whose inputs it records.
        outputs: Frontier keys it computes for later rounds.
        keep: Every frontier key after the round (`outputs` and the values
            of earlier rounds that later rounds still need).
        finalized: BN layers whose statistics are complete after this round
            (the caller assigns them before the next round).
        function: The compiled round for one batch (see `run_round`).
        stacked_function: The compiled round for stacked batches (see
            `run_round_stacked`).
        traced: The traces for any batch size, by function, masked inputs and
            the inputs' dtypes and other dimensions.
    """

    inputs: tuple[int, ...]
    steps: tuple[Step, ...]
    records: tuple[Step, ...]
    outputs: tuple[int, ...]
    keep: tuple[int, ...]
    finalized: tuple
    function: object = None
    stacked_function: object = None
    traced: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Plan:
    """The rounds of a model, and how a batch enters them.

    Attributes:
        graph: The Functional graph the rounds run (see
            `model_graph.graph_of`).
        input_keys: The frontier keys of the graph's inputs.
        rounds: The rounds, in order; each finalizes some BN layers.
    """

    graph: object
    input_keys: tuple[int, ...]
    rounds: list[Round]

    def bind(self, inputs) -> dict[int, tuple]:
        """The model inputs of one batch as a frontier: key -> (value, mask)."""
        flat = self.graph._standardize_inputs(inputs)
        if len(flat) != len(self.input_keys):
            raise ValueError(
                f"The model takes {len(self.input_keys)} inputs but a batch of `dataset` "
                f"gave {len(flat)}. Yield each batch's inputs as a dict by input name, or "
                "as `((x1, x2), y)` as for `fit` (a bare pair is read as `(x, y)`)."
            )
        return {key: (value, None) for key, value in zip(self.input_keys, flat)}


def build_plan(model, record_fn) -> Plan | None:
    """Splits `model` into rounds, or None when it cannot be split exactly.

    Args:
        model: A Keras model.
        record_fn: `record_fn(layer, x, mask) -> tensors`, traced inside the
            rounds for every recorded BN call; its results are returned by
            `run_round`.

    Returns:
        A `Plan`, or None for a subclassed model, BN layers the graph does
        not show, or BN calls that depend on each other's statistics in a
        cycle.
    """
    try:
        graph = model_graph.graph_of(model)
    except (TypeError, ValueError):
        return None
    try:
        counter = [0]
        input_keys = _new_keys(counter, len(graph.inputs))
        steps: list[Step] = []
        _flatten(graph, input_keys, steps, counter)
        rounds = _schedule(input_keys, steps)
    except _Unsupported:
        return None
    plan = Plan(graph, input_keys, rounds)
    for one_round in rounds:
        one_round.function, one_round.stacked_function = _compile(one_round, record_fn)
    return plan


def run_round(one_round: Round, frontier: dict[int, tuple]):
    """Runs one compiled round on one batch's frontier.

    Args:
        one_round: A round of the plan.
        frontier: key -> (value, mask or None), holding `one_round.inputs`.

    Returns:
        `(next_frontier, records)`: the frontier for later rounds (key ->
        (value, mask)) and one `record_fn` result per `one_round.records`.
    """
    return _run(one_round, one_round.function, frontier, batch_axes=1)


def run_round_stacked(one_round: Round, frontier: dict[int, tuple]):
    """Runs one round on a stack of equally shaped batches, in one call.

    The batches run one by one (`tf.map_fn` over the round's per-batch
    function), so each gets exactly what `run_round` would compute; only the
    per-call overhead is shared.

    Args:
        one_round: A round of the plan.
        frontier: key -> (value, mask or None), each stacked on a new first
            axis (see `stack_frontiers`).

    Returns:
        Like `run_round`, with every tensor stacked on the first axis.
    """
    return _run(one_round, one_round.stacked_function, frontier, batch_axes=2)


def stack_frontiers(frontiers: list[dict], min_stack: int) -> list[tuple[int | None, dict]]:
    """Stacks long runs of consecutive batch frontiers whose shapes agree.

    A stacked round pays a larger one-time cost (its first call builds and
    optimizes a loop) for a smaller cost per batch, so only runs of at
    least `min_stack` batches are stacked.

    Args:
        frontiers: One frontier per batch (key -> (value, mask or None)).
        min_stack: The shortest run worth stacking.

    Returns:
        `(size, frontier)` pairs in batch order: `size` batches stacked on a
        new first axis (for `run_round_stacked`), or `size` None for a
        single batch's frontier (for `run_round`).
    """
    runs: list[list[dict]] = []
    for frontier in frontiers:
        if runs and _signature(runs[-1][0]) == _signature(frontier):
            runs[-1].append(frontier)
        else:
            runs.append([frontier])
    result: list[tuple[int | None, dict]] = []
    for run in runs:
        if len(run) < min_stack:
            result.extend((None, frontier) for frontier in run)
            continue
        group = {}
        for key, (_, mask) in run[0].items():
            values = tf.stack([frontier[key][0] for frontier in run])
            masks = None if mask is None else tf.stack([frontier[key][1] for frontier in run])
            group[key] = (values, masks)
        result.append((len(run), group))
    return result


def _signature(frontier):
    return {
        key: (value.dtype, tuple(value.shape), None if mask is None else tuple(mask.shape))
        for key, (value, mask) in frontier.items()
    }


def _run(one_round, function, frontier, batch_axes):
    values = {_name(key): frontier[key][0] for key in one_round.inputs}
    masks = {
        _name(key): frontier[key][1] for key in one_round.inputs if frontier[key][1] is not None
    }
    signature = (id(function), tuple(masks)) + tuple(
        (value.dtype, tuple(value.shape[batch_axes:])) for value in values.values()
    )
    concrete = one_round.traced.get(signature)
    if concrete is None:
        # One trace for every batch size (the last batch is often smaller),
        # instead of a second trace per round for it.
        def relaxed(tensor):
            shape = [None] * batch_axes + tensor.shape.as_list()[batch_axes:]
            return tf.TensorSpec(shape, tensor.dtype)

        specs = tf.nest.map_structure(relaxed, (values, masks))
        concrete = function.get_concrete_function(*specs)
        one_round.traced[signature] = concrete
    # The concrete function skips tf.function's per-call signature matching.
    out_values, out_masks, records = concrete(values, masks)
    next_frontier = {key: frontier[key] for key in one_round.keep if key in frontier}
    for key in one_round.outputs:
        next_frontier[key] = (out_values[_name(key)], out_masks.get(_name(key)))
    return next_frontier, records


def _name(key: int) -> str:
    return f"k{key:06d}"


def _new_keys(counter, count) -> tuple[int, ...]:
    keys = tuple(range(counter[0], counter[0] + count))
    counter[0] += count
    return keys


def _flatten(graph, input_keys, steps, counter) -> list[int]:
    """Appends the graph's calls to `steps`, nested models inlined; returns output keys."""
    keys = {id(tensor): key for tensor, key in zip(graph.inputs, input_keys)}
    for node in model_graph.graph_nodes(graph):
        operation = node.operation
        in_keys = [keys[id(tensor)] for tensor in node.input_tensors]
        if introspection.is_batch_norm(operation):
            out_keys = _new_keys(counter, len(node.outputs))
            steps.append(Step(node, tuple(in_keys), out_keys))
        elif introspection.batch_norm_layers(operation):
            inner = _inlinable_graph(operation, node)
            out_keys = _flatten(inner, in_keys, steps, counter)
        else:
            out_keys = _new_keys(counter, len(node.outputs))
            steps.append(Step(node, tuple(in_keys), out_keys))
        for tensor, key in zip(node.outputs, out_keys):
            keys[id(tensor)] = key
    return [keys[id(tensor)] for tensor in graph.outputs]


def _inlinable_graph(operation, node):
    """The graph of a nested model called on exactly its inputs, or _Unsupported."""
    if not isinstance(operation, keras.Model):
        raise _Unsupported(f"BN layers hidden inside {operation.name!r}")
    try:
        inner = model_graph.graph_of(operation)
    except (TypeError, ValueError) as error:
        raise _Unsupported(str(error)) from None
    extra = {k: v for k, v in node.arguments.kwargs.items() if v is not None and k != "training"}
    if extra or len(node.input_tensors) != len(inner.inputs):
        raise _Unsupported(f"nested model {operation.name!r} called with extra arguments")
    for outer, inner_input in zip(node.input_tensors, inner.inputs):
        if outer.dtype != inner_input.dtype:
            raise _Unsupported(f"nested model {operation.name!r} casts its inputs")
    return inner


def _schedule(input_keys, steps) -> list[Round]:
    """Groups the steps into rounds; raises _Unsupported on a cycle."""
    needed = _needed_steps(steps)
    bn_calls: dict[int, list[Step]] = {}
    for step in steps:
        if introspection.is_batch_norm(step.operation):
            bn_calls.setdefault(id(step.operation), []).append(step)
    available = set(input_keys)
    done: set[int] = set()
    recorded: set[int] = set()
    final: set[int] = set()
    rounds = []
    while len(final) < len(bn_calls):
        computed, records, start = [], [], set(available)
        for step in steps:
            if id(step) in done or not all(key in available for key in step.input_keys):
                continue
            is_bn = introspection.is_batch_norm(step.operation)
            if is_bn and id(step.operation) not in final:
                if id(step) not in recorded:
                    recorded.add(id(step))
                    records.append(step)
                continue
            if id(step) in needed:
                computed.append(step)
                done.add(id(step))
                available.update(step.output_keys)
        finalized = [
            calls[0].operation
            for layer_id, calls in bn_calls.items()
            if layer_id not in final and all(id(call) in recorded for call in calls)
        ]
        if not finalized:
            raise _Unsupported("BN calls depend on each other's statistics in a cycle")
        final.update(id(layer) for layer in finalized)
        later = {
            key
            for s in steps
            if (id(s) in needed and id(s) not in done)
            or (introspection.is_batch_norm(s.operation) and id(s) not in recorded)
            for key in s.input_keys
        }
        reads = {key for s in computed + records for key in s.input_keys}
        rounds.append(
            Round(
                inputs=tuple(sorted(reads & start)),
                steps=tuple(computed),
                records=tuple(records),
                outputs=tuple(sorted(later & (available - start))),
                keep=tuple(sorted(later & available)),
                finalized=tuple(finalized),
            )
        )
    return rounds


def _needed_steps(steps) -> set[int]:
    """Ids of the steps whose outputs lead to some BN call's input."""
    wanted = {
        key for s in steps if introspection.is_batch_norm(s.operation) for key in s.input_keys
    }
    needed = set()
    for step in reversed(steps):
        if wanted.intersection(step.output_keys):
            needed.add(id(step))
            wanted.update(step.input_keys)
    return needed


def _takes_training(operation) -> bool:
    if "training" in getattr(operation, "_call_context_args", ()):
        return True
    call = getattr(operation, "call", None)
    try:
        return call is not None and "training" in inspect.signature(call).parameters
    except (TypeError, ValueError):
        return False


def _compile(one_round: Round, record_fn):
    def run(values, masks):
        computed = {}
        for key in one_round.inputs:
            value = values[_name(key)]
            if _name(key) in masks:
                value = tf.identity(value)  # A fresh tensor to carry the mask.
                masking.set_keras_mask(value, masks[_name(key)])
            computed[key] = value
        for step in one_round.steps:
            args, kwargs = _arguments(step, computed)
            if _takes_training(step.operation):
                kwargs["training"] = False
            outputs = keras.tree.flatten(step.operation(*args, **kwargs))
            for key, output in zip(step.output_keys, outputs):
                computed[key] = output
        records = []
        for step in one_round.records:
            args, kwargs = _arguments(step, computed)
            x = args[0] if args else kwargs["inputs"]
            mask = kwargs.get("mask")
            if mask is None:
                mask = masking.get_keras_mask(x)
            records.append(record_fn(step.operation, x, mask))
        out_values = {_name(key): computed[key] for key in one_round.outputs}
        out_masks = {}
        for key in one_round.outputs:
            mask = masking.get_keras_mask(computed[key])
            if mask is not None:
                out_masks[_name(key)] = mask
        return out_values, out_masks, records

    # Plain Python over a static list of layers: nothing for AutoGraph to convert.
    per_batch = tf.function(run, reduce_retracing=True, autograph=False)

    def run_stacked(values, masks):
        def element_spec(stacked):
            return tf.TensorSpec(stacked.shape[1:], stacked.dtype)

        specs = tf.nest.map_structure(element_spec, (values, masks))
        concrete = per_batch.get_concrete_function(*specs)
        signature = tf.nest.map_structure(
            lambda t: tf.TensorSpec(t.shape, t.dtype), concrete.structured_outputs
        )
        return tf.map_fn(
            lambda element: concrete(*element), (values, masks), fn_output_signature=signature
        )

    return per_batch, tf.function(run_stacked, reduce_retracing=True, autograph=False)


def _arguments(step: Step, computed):
    tensors = {id(t): computed[key] for t, key in zip(step.node.input_tensors, step.input_keys)}
    return step.node.arguments.fill_in(tensors)
