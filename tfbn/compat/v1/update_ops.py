"""Wiring BN update ops into a TF1 train op, and proving that it was done.

TF1's most repeated batch-norm bug: `optimizer.minimize()` does not run the
ops in `UPDATE_OPS`, so the moving statistics stay at 0/1 and the model is
good in training and bad at evaluation. The second most repeated one: the
global collection is not filtered by scope, so a frozen backbone's statistics
are rewritten during a head-only fine-tune. `minimize_with_updates` builds
the train op with exactly one scope's update ops; `check_update_dependencies`
finds a train op that misses some before the first step runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

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
    """
    if not isinstance(optimizer, tf.compat.v1.train.Optimizer):
        raise TypeError(
            "`optimizer` must be a tf.compat.v1.train.Optimizer (e.g. "
            f"tf.compat.v1.train.AdamOptimizer); received {type(optimizer).__name__}."
        )
    graph = loss.graph
    update_ops = graph.get_collection(collection, update_scope)
    if not update_ops:
        raise ValueError(
            f"no BN update ops found in scope {update_scope!r} of collection "
            f"{collection!r}. Build the model (with training=True or a training "
            "placeholder) before the train op, and check the scope name."
        )
    variables = _resolve_var_list(var_list, graph)
    with graph.as_default(), tf.control_dependencies(update_ops):
        return optimizer.minimize(loss, var_list=variables, global_step=global_step, name=name)
