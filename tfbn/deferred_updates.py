"""UPDATE_OPS made explicit: collect moving-statistic updates, apply them by path.

Outside a collector, a `tfbn.BatchNormalization` layer updates its moving
statistics as soon as it is called in training mode, which is what
`model.fit` expects. Inside ``with tfbn.deferred_updates() as updates:`` it
records a `PendingUpdate` instead, and the caller decides which of them run:

    with tfbn.deferred_updates() as updates:
        with tf.GradientTape() as tape:
            loss = loss_fn(model(x, training=True))
        grads = tape.gradient(loss, head_vars)
        optimizer.apply(grads, head_vars)
        updates.apply(include=[r"head/"])   # the head's statistics move
        updates.discard()                   # the backbone's stay frozen

Leaving the block while updates are neither applied nor discarded raises
`UnappliedUpdatesError`: TF1's silent "forgot the UPDATE_OPS" bug, made loud.

The active collector is per thread, so each replica function that
`tf.distribute` runs in its own thread opens its own collector.

A collector belongs to the graph it was opened in: the recorded updates hold
that graph's tensors. A layer called inside a `tf.function` (or Keras'
compiled `model.fit` step) while the open collector belongs to the eager
context (or to another function) raises `CollectorScopeError` at trace time,
instead of recording tensors that cannot be applied there and that a cached
trace would never record again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
from collections.abc import Callable, Iterator, Sequence

import tensorflow as tf

Patterns = str | Sequence[str] | None


class UnappliedUpdatesError(RuntimeError):
    """Raised when a `deferred_updates` block ends with pending updates."""


class CollectorScopeError(RuntimeError):
    """A layer recorded an update into a collector opened in another graph."""

    # AutoGraph re-raises an error from a traced function as its own type
    # only if that type takes the plain `Exception` constructor; otherwise
    # the caller would get a generic StagingError.
    __init__ = Exception.__init__


@dataclasses.dataclass(frozen=True)
class PendingUpdate:
    """One recorded moving-statistics update of one layer call.

    Attributes:
        path: The layer's Keras path (e.g. ``"backbone/bn1"``), matched by the
            include/exclude patterns.
        layer: The layer that recorded the update.
        apply_fn: Runs the update; returns the assign ops (graph mode) so they
            can be used as control dependencies. It reads the moving
            statistics when it runs, so updates of a layer called twice
            compose in order.
    """

    path: str
    layer: object
    apply_fn: Callable[[], list[object]]


_local = threading.local()


def _stack() -> list[UpdateCollector]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def active_collector() -> UpdateCollector | None:
    """The innermost open collector of this thread, or None."""
    stack = _stack()
    return stack[-1] if stack else None


def _current_graph():
    """The graph that ops are built in now; None when executing eagerly."""
    return None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()


def _describe_graph(graph) -> str:
    if graph is None:
        return "eager context"
    kind = "tf.function" if getattr(graph, "building_function", False) else "graph"
    return f"{kind} {graph.name!r}" if getattr(graph, "name", None) else kind


def _as_pattern_list(name: str, patterns: Patterns) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    if not all(isinstance(pattern, str) for pattern in patterns):
        raise TypeError(
            f"`{name}` must be a regex string or a list of them; received "
            f"{patterns!r}. Example: {name}=[r'backbone/']."
        )
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(
                f"`{name}` pattern {pattern!r} is not a valid regular expression: "
                f"{error}. Escape literal characters (re.escape) or fix the pattern, "
                f"e.g. {name}=[r'backbone/']."
            ) from None
    return list(patterns)


class UpdateCollector:
    """The pending updates of one `deferred_updates()` block."""

    def __init__(self):
        self._pending: list[PendingUpdate] = []
        # Updates may only be recorded from the graph the block was opened in.
        self._graph = _current_graph()

    @property
    def pending(self) -> tuple:
        """The updates recorded and not yet applied or discarded, in call order."""
        return tuple(self._pending)

    @property
    def paths(self) -> list[str]:
        """The layer paths of the pending updates, in call order (may repeat)."""
        return [update.path for update in self._pending]

    def record(self, update: PendingUpdate) -> None:
        """Adds an update; called by layers, not by users.

        Raises:
            CollectorScopeError: If the update is built inside a `tf.function`
                (or Keras' compiled train step) other than the one the
                collector was opened in: its tensors could never be applied
                from the collector's context, and a cached trace would never
                record the update again.
        """
        graph = _current_graph()
        if graph is not self._graph and tf.inside_function():
            raise CollectorScopeError(
                f"layer {update.path!r} was called inside {_describe_graph(graph)} "
                f"while the open tfbn.deferred_updates() collector belongs to "
                f"{_describe_graph(self._graph)}. Its update could never be applied "
                "there, and later calls of the traced function would record nothing, "
                "so the moving statistics would silently never move. Open the "
                "collector inside the function that calls the layer and apply or "
                "discard the updates there:\n"
                "    @tf.function\n"
                "    def train_step(x):\n"
                "        with tfbn.deferred_updates() as updates:\n"
                "            ...model(x, training=True)...\n"
                "            updates.apply(include=...)\n"
                "With model.fit, do not wrap fit in a collector: outside a collector "
                "the layers update at call time (or override train_step and open the "
                "collector there)."
            )
        self._pending.append(update)

    def _select(self, include: Patterns, exclude: Patterns, layers) -> list[PendingUpdate]:
        if layers is not None:
            if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
                raise TypeError(
                    f"`layers` must be a collection of layer objects; received {layers!r}. "
                    "Example: layers=[model.get_layer('bn1')]."
                )
            wanted = {id(layer) for layer in layers}
        include_list = _as_pattern_list("include", include)
        exclude_list = _as_pattern_list("exclude", exclude)
        known = sorted(set(self.paths))
        for name, patterns in (("include", include_list), ("exclude", exclude_list)):
            for pattern in patterns or ():
                if not any(re.match(pattern, path) for path in known):
                    raise ValueError(
                        f"{name} pattern {pattern!r} matches no pending update. "
                        f"Pending layer paths: {known or 'none'}. Patterns are "
                        "matched with re.match against the start of the path; "
                        "fix the pattern or drop it."
                    )

        def selected(update: PendingUpdate) -> bool:
            if layers is not None and id(update.layer) not in wanted:
                return False
            path = update.path
            if include_list is not None and not any(re.match(p, path) for p in include_list):
                return False
            return not any(re.match(p, path) for p in exclude_list or ())

        return [update for update in self._pending if selected(update)]

    def apply(self, include: Patterns = None, exclude: Patterns = None, *, layers=None) -> list:
        """Runs the selected pending updates in the order they were recorded.

        Args:
            include: Regex pattern(s); only updates of layers whose path
                `re.match`es one of them run. None selects every update.
            exclude: Regex pattern(s); updates of matching layers are skipped
                (they stay pending).
            layers: Optional collection of layer objects; only their updates
                run (combined with the patterns). Selecting by object needs no
                path to be unique or regex-safe.

        Returns:
            A list of the assign ops, suitable for `tf.control_dependencies`
            (empty in eager mode, where the updates have already happened).

        Raises:
            ValueError: If a pattern is not a valid regular expression, or
                matches no pending update (a typo must not silently freeze or
                update the wrong layers).
        """
        chosen = self._select(include, exclude, layers)
        ops = []
        for update in chosen:
            ops.extend(op for op in update.apply_fn() if op is not None)
        chosen_ids = {id(update) for update in chosen}
        self._pending = [u for u in self._pending if id(u) not in chosen_ids]
        return ops

    def discard(self, include: Patterns = None, exclude: Patterns = None, *, layers=None) -> None:
        """Drops the selected pending updates without running them.

        Args:
            include: Regex pattern(s) selecting the updates to drop; None
                selects every pending update.
            exclude: Regex pattern(s) of updates to keep pending.
            layers: Optional collection of layer objects whose updates to drop.

        Raises:
            ValueError: If a pattern is not a valid regular expression, or
                matches no pending update.
        """
        chosen_ids = {id(update) for update in self._select(include, exclude, layers)}
        self._pending = [u for u in self._pending if id(u) not in chosen_ids]


def route_update(layer, apply_fn: Callable[[], list]) -> None:
    """Where a layer's moving-statistics update goes, decided in one place.

    Inside a `deferred_updates()` block the update is recorded as pending.
    Outside, it runs now (Keras behaviour, so `model.fit` works); in a
    TF1-style graph, which runs only what is fetched, its ops are also
    published to `UPDATE_OPS` where TF1 code looks for them, instead of being
    silently dropped.

    Args:
        layer: The layer (its `path`, else `name`, is matched by patterns).
        apply_fn: Runs the update and returns its assign ops (None entries
            allowed).
    """
    collector = active_collector()
    if collector is not None:
        collector.record(
            PendingUpdate(path=layer.path or layer.name, layer=layer, apply_fn=apply_fn)
        )
        return
    ops = apply_fn()
    if not tf.executing_eagerly() and not tf.inside_function():
        for op in ops:
            if op is not None:
                tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.UPDATE_OPS, op)


@contextlib.contextmanager
def deferred_updates() -> Iterator[UpdateCollector]:
    """Collects the moving-statistics updates of tfbn layers called in the block.

    Works eagerly and while tracing a `tf.function` (the collector is a
    trace-time Python object; open it, and apply the updates, inside the
    same function that calls the layers).

    Yields:
        The `UpdateCollector` holding the pending updates.

    Raises:
        UnappliedUpdatesError: On leaving the block normally while updates are
            still pending. Call `updates.apply()` or `updates.discard()`.
        CollectorScopeError: When a layer in the block is called inside a
            `tf.function` (e.g. `model.fit`'s train step) that the block was
            not opened in; open the collector inside that function.
    """
    collector = UpdateCollector()
    stack = _stack()
    stack.append(collector)
    try:
        yield collector
    finally:
        stack.remove(collector)
    if collector.pending:
        raise UnappliedUpdatesError(
            f"{len(collector.pending)} moving-statistics update(s) were "
            f"recorded but neither applied nor discarded: {collector.paths}. "
            "Inside the block, call updates.apply(include=...) for the layers "
            "whose statistics should move and updates.discard() for the rest."
        )
