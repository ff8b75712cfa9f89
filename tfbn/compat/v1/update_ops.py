"""Wiring BN update ops into a TF1 train op, and proving that it was done.

TF1's most repeated batch-norm bug: `optimizer.minimize()` does not run the
ops in `UPDATE_OPS`, so the moving statistics stay at 0/1 and the model is
good in training and bad at evaluation. The second most repeated one: the
global collection is not filtered by scope, so a frozen backbone's statistics
are rewritten during a head-only fine-tune. `minimize_with_updates` builds
the train op with exactly one scope's update ops; `check_update_dependencies`
finds a train op that misses some before the first step runs.
`apply_gradients_with_updates` is the same for the `compute_gradients` ->
clip -> `apply_gradients` step.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import tensorflow as tf

from tfbn.nn.batch_norm import STATISTIC_NAMES

UPDATE_OPS = tf.compat.v1.GraphKeys.UPDATE_OPS


class MissingUpdateDependenciesError(ValueError):
    """A train op does not depend on update ops that it should run."""


def _as_op(item) -> tf.Operation:
    return item if isinstance(item, tf.Operation) else item.op


def _ancestors(op: tf.Operation) -> set:
    """Every op that must run before `op` (data and control inputs)."""
    seen = {op}
    stack = [op]
    while stack:
        current = stack.pop()
        parents = [tensor.op for tensor in current.inputs] + list(current.control_inputs)
        for parent in parents:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def check_update_dependencies(
    train_op, scope: str | None = None, collection: str = UPDATE_OPS
) -> list[tf.Operation]:
    """Raises unless every update op in `scope` runs whenever `train_op` runs.

    Call it once after building the train op and before the first
    `session.run`: it turns "moving statistics silently stuck at 0/1" into an
    error at graph-construction time.

    Args:
        train_op: The train `tf.Operation` (or a tensor) that each step runs.
        scope: Optional name-scope prefix (TF1's `get_collection` rule,
            `re.match` on the op name) selecting the update ops to require,
            e.g. `"tiny_yolo/yolov3_head"`. None requires all of them.
        collection: The collection holding the update ops.

    Returns:
        The update ops found in the scope (all of them ancestors of
        `train_op`); empty when the scope has none.

    Raises:
        MissingUpdateDependenciesError: (a ValueError) listing the names of the
            update ops that are not ancestors of `train_op`.
    """
    train_op = _as_op(train_op)
    update_ops = [_as_op(item) for item in train_op.graph.get_collection(collection, scope)]
    if not update_ops:
        return []
    ancestors = _ancestors(train_op)
    missing = [op.name for op in update_ops if op not in ancestors]
    if missing:
        raise MissingUpdateDependenciesError(
            f"train op {train_op.name!r} does not depend on {len(missing)} of the "
            f"{len(update_ops)} ops in collection {collection!r} (scope "
            f"{scope!r}): {missing}. Their moving statistics would never "
            "change. Build the train op with tfbn.compat.v1.minimize_with_updates"
            "(..., update_scope=...), or under tf.control_dependencies(update_ops)."
        )
    return update_ops


def _resolve_var_list(var_list, graph) -> list[tf.Variable] | None:
    """Variables as given, or every trainable variable under each scope string."""
    if var_list is None:
        return None
    entries = [var_list] if isinstance(var_list, str) else list(var_list)
    variables = []
    for entry in entries:
        if isinstance(entry, str):
            found = graph.get_collection(tf.compat.v1.GraphKeys.TRAINABLE_VARIABLES, entry)
            if not found:
                raise ValueError(
                    f"`var_list` scope {entry!r} matches no trainable variable; "
                    "check the spelling (scopes are name prefixes, e.g. "
                    "'tiny_yolo/yolov3_head')."
                )
            variables.extend(found)
        else:
            variables.append(entry)
    if not variables:
        raise ValueError(f"`var_list` is empty (received {var_list!r}); pass None to train all.")
    return list(dict.fromkeys(variables))


def _check_optimizer(optimizer) -> None:
    if not isinstance(optimizer, tf.compat.v1.train.Optimizer):
        raise TypeError(
            "`optimizer` must be a tf.compat.v1.train.Optimizer (e.g. "
            f"tf.compat.v1.train.AdamOptimizer); received {type(optimizer).__name__}."
        )


def _scope_update_ops(graph, update_scope: str | None, collection: str) -> list:
    update_ops = graph.get_collection(collection, update_scope)
    if not update_ops:
        raise ValueError(
            f"no BN update ops found in scope {update_scope!r} of collection "
            f"{collection!r}. Build the model (with training=True or a training "
            "placeholder) before the train op, and check the scope name."
        )
    return update_ops


def _variable_name(variable) -> str:
    op = getattr(variable, "op", None)
    return op.name if op is not None else variable.name.split(":")[0]


def _warn_about_statistics(argument: str, variables) -> None:
    """Warns when variables to train include BN moving statistics."""
    names = [_variable_name(v) for v in variables]
    statistics = [name for name in names if name.rsplit("/", 1)[-1] in STATISTIC_NAMES]
    if statistics:
        warnings.warn(
            f"`{argument}` contains {len(statistics)} BN moving-statistics variable(s): "
            f"{statistics}. The update ops move them, not gradients: the optimizer only "
            "gives them (None) gradients and slots for nothing. Pass the trainable "
            "variables instead, e.g. tf.compat.v1.trainable_variables(scope).",
            UserWarning,
            stacklevel=3,
        )


def minimize_with_updates(
    optimizer: tf.compat.v1.train.Optimizer,
    loss: tf.Tensor,
    var_list: None | str | Sequence = None,
    update_scope: str | None = None,
    global_step: tf.Variable | None = None,
    collection: str = UPDATE_OPS,
    name: str | None = None,
) -> tf.Operation:
    """`optimizer.minimize` with the BN update ops of one scope as dependencies.

    The one-call replacement for

        update_ops = tf.get_collection(tf.GraphKeys.UPDATE_OPS)
        with tf.control_dependencies(update_ops):
            train_op = optimizer.minimize(loss, var_list=..., global_step=...)

    that restricts the updates to `update_scope` (so a frozen backbone's
    statistics stay bit-identical while the head's move) and refuses to build
    a train op without updates.

    Args:
        optimizer: A `tf.compat.v1.train.Optimizer` (e.g.
            `GradientDescentOptimizer`, `AdamOptimizer`).
        loss: The scalar loss tensor.
        var_list: The variables to train: None (all trainable), a list of
            variables, or scope strings (each selects the trainable variables
            under it and must match at least one).
        update_scope: Name-scope prefix of the update ops to run, e.g.
            `"tiny_yolo/yolov3_head"`; None runs all of the collection.
        global_step: Optional step variable incremented by the train op.
        collection: The collection holding the update ops.
        name: Optional name of the returned op.

    Returns:
        The train op; it depends on exactly the update ops of `update_scope`.

    Raises:
        TypeError: If `optimizer` is not a `tf.compat.v1.train.Optimizer`.
        ValueError: "no BN update ops found in scope ..." when the scope has
            no update op (built too early, wrong scope, or inference-only
            layers), or a `var_list` scope that matches nothing.

    Warns:
        UserWarning: When `var_list` holds BN moving statistics (named).
    """
    _check_optimizer(optimizer)
    graph = loss.graph
    update_ops = _scope_update_ops(graph, update_scope, collection)
    variables = _resolve_var_list(var_list, graph)
    if variables is not None:
        _warn_about_statistics("var_list", variables)
    with graph.as_default(), tf.control_dependencies(update_ops):
        return optimizer.minimize(loss, var_list=variables, global_step=global_step, name=name)


def apply_gradients_with_updates(
    optimizer: tf.compat.v1.train.Optimizer,
    grads_and_vars: Sequence,
    update_scope: str | None = None,
    global_step: tf.Variable | None = None,
    collection: str = UPDATE_OPS,
    name: str | None = None,
) -> tf.Operation:
    """`optimizer.apply_gradients` with the BN update ops of one scope as dependencies.

    For train ops that transform the gradients (clipping, scaling, noise)
    between `compute_gradients` and `apply_gradients`, where
    `minimize_with_updates` does not fit:

        grads_and_vars = optimizer.compute_gradients(loss, var_list=head_vars)
        grads, variables = zip(*grads_and_vars)
        grads, _ = tf.clip_by_global_norm(grads, 5.0)
        train_op = tfbn.compat.v1.apply_gradients_with_updates(
            optimizer, zip(grads, variables), update_scope="model/head")

    Args:
        optimizer: A `tf.compat.v1.train.Optimizer`.
        grads_and_vars: `(gradient, variable)` pairs, as `compute_gradients`
            returns them (None gradients allowed, as in `apply_gradients`).
        update_scope: Name-scope prefix of the update ops to run, e.g.
            `"tiny_yolo/yolov3_head"`; None runs all of the collection.
        global_step: Optional step variable incremented by the train op.
        collection: The collection holding the update ops.
        name: Optional name of the returned op.

    Returns:
        The train op; it depends on exactly the update ops of `update_scope`.

    Raises:
        TypeError: If `optimizer` is not a `tf.compat.v1.train.Optimizer` or an
            entry of `grads_and_vars` is not a `(gradient, variable)` pair.
        ValueError: If `grads_and_vars` is empty, or "no BN update ops found in
            scope ..." when the scope has no update op.

    Warns:
        UserWarning: When `grads_and_vars` holds BN moving statistics (named).
    """
    _check_optimizer(optimizer)
    pairs = list(grads_and_vars)
    if not pairs:
        raise ValueError(
            "`grads_and_vars` is empty; pass optimizer.compute_gradients(loss, ...) "
            "(after clipping) as (gradient, variable) pairs."
        )
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(
                "`grads_and_vars` must hold (gradient, variable) pairs; received the "
                f"entry {pair!r}. Example: zip(clipped_grads, variables)."
            )
    variables = [variable for _, variable in pairs]
    _warn_about_statistics("grads_and_vars", variables)
    graph = variables[0].graph
    update_ops = _scope_update_ops(graph, update_scope, collection)
    with graph.as_default(), tf.control_dependencies(update_ops):
        return optimizer.apply_gradients(pairs, global_step=global_step, name=name)
