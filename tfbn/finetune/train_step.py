"""The train step and the eval step of the fine-tune trainer.

One training step (a `tf.function`), the Tiny-YOLO `var_list` + UPDATE_OPS
wiring done right:

1. forward with `training=True` under `tfbn.deferred_updates()`;
2. gradients for the update set only;
3. if the loss and every gradient are finite: apply the gradients, then the
   BN updates of the layers whose `BNMode` updates statistics (`TRAIN`, and
   `ADAPT` for frozen layers); otherwise apply neither and count the step
   as skipped.

BN layers outside the update set follow their frozen mode:

* `INFERENCE`: the layer runs with `trainable=False` (Keras' rule: moving
  statistics, no update), so its statistics stay bit-identical;
* `BATCH`: batch statistics, and its pending update is discarded;
* `ADAPT`: batch statistics, and its update is applied (AdaBN).

`bn_modes(plan)` sets those `trainable` flags for the duration of a step
and restores them afterwards, even when the step raises. Stock
`keras.layers.BatchNormalization` layers update their statistics inside
the forward pass; the step snapshots them first and writes the snapshot
back whenever their update must not happen (`BATCH` mode, or a skipped
step), so they follow the same contract.

The same step runs under every `tf.distribute` strategy: one replica
function per replica, the finite verdict all-reduced so all replicas apply
or all skip, and BN updates applied once per replica step in the replica
context.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import keras
import tensorflow as tf
from absl import logging

from tfbn.deferred_updates import deferred_updates
from tfbn.finetune.update_plan import UpdatePlan
from tfbn.layers.batch_normalization import BatchNormalization


@contextlib.contextmanager
def bn_modes(plan: UpdatePlan) -> Iterator[None]:
    """Runs the block with every BN layer's `trainable` flag set for its mode.

    Only `INFERENCE` needs `trainable=False`; the other modes run with batch
    statistics and the train step decides what happens to their updates.
    The previous flags are restored on exit, also when the block raises.

    Args:
        plan: The update plan whose `bn_modes` to apply.

    Yields:
        None.
    """
    previous = [(layer, layer.trainable) for layer, _ in plan.bn_modes]
    try:
        for layer, mode in plan.bn_modes:
            layer.trainable = mode.uses_batch_statistics
        yield
    finally:
        for layer, trainable in previous:
            layer.trainable = trainable


def warn_about_repeated_calls(paths: list[str]) -> list[str]:
    """Warns (at trace time) about BN layers called more than once in a step.

    Each call records and applies one update, so a layer shared by two towers
    or a siamese pair moves its statistics twice per step: its effective
    momentum is `momentum ** calls`. That is often intended, never obvious.

    Args:
        paths: The layer path of every pending update of one step, in call
            order.

    Returns:
        The repeated layer paths, sorted.
    """
    repeated = sorted({path for path in paths if paths.count(path) > 1})
    if repeated:
        logging.warning(
            "BN layer(s) %s are called more than once per training step: each call "
            "applies one moving-statistics update, in order, so their statistics decay "
            "as momentum**calls per step. Use separate layers if that is not intended.",
            repeated,
        )
    return repeated


@dataclasses.dataclass
class TrainStep:
    """A built train step and its counters.

    Call it as `step(images, labels)`; it applies the plan's BN modes (see
    `bn_modes`) around the compiled step. Under a strategy with several
    replicas, pass per-replica values (`distribution.distribute_batch`);
    otherwise plain batches.

    Attributes:
        function: The `tf.function` `(images, labels) -> {"loss", "accuracy",
            "applied"}`: the global batch's mean loss and accuracy, and
            whether the step was applied.
        plan: The update plan the step carries out.
        global_step: int64 variable incremented by every step.
        skipped_steps: int64 variable incremented by every skipped step.
    """

    function: Callable[..., dict]
    plan: UpdatePlan
    global_step: tf.Variable
    skipped_steps: tf.Variable

    def __call__(self, images, labels) -> dict:
        """Runs one step on a batch; returns the step's outputs (see `function`)."""
        with bn_modes(self.plan):
            return self.function(images, labels)


def build_train_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    plan: UpdatePlan,
    strategy: tf.distribute.Strategy | None = None,
    global_step: tf.Variable | None = None,
    skipped_steps: tf.Variable | None = None,
) -> TrainStep:
    """Builds the train step for `plan`: the one step every caller shares.

    The same step runs under every strategy; the default strategy is the
    one-replica case. Each replica opens its own `deferred_updates()`
    collector (collectors are per thread, and `MirroredStrategy` runs
    replicas in threads), scales its loss by the global batch size, and
    checks its loss and gradients. The verdict is all-reduced, so every
    replica takes the same branch. Because `tf.distribute` forbids
    cross-replica synchronisation inside a replica's `tf.cond`, the branch is
    taken in the cross-replica context (`merge_call`), where each replica
    then applies the all-reduced gradients (`optimizer.apply` sums them) and
    its pending BN updates. tfbn moving statistics are MEAN-aggregated
    mirrored variables, so the update leaves every replica with the same
    statistics (the global-batch ones with synchronized BN, else the mean of
    the local ones); stock Keras BN statistics (aggregation NONE) are
    averaged explicitly to the same effect.

    Args:
        model: The model; it must map inputs to logits. Create it, and its
            optimizer, under `strategy.scope()`.
        optimizer: The optimizer for `plan.update_variables`; built here
            when it is not built yet.
        plan: The update plan.
        strategy: The `tf.distribute.Strategy`; None means the current one
            (the default strategy outside any scope).
        global_step: int64 step counter; None creates one (under
            `strategy.scope()`).
        skipped_steps: int64 skipped-step counter; None creates one.

    Returns:
        The `TrainStep`, holding the step function and both counters.
    """
    if strategy is None:
        strategy = tf.distribute.get_strategy()
    update_variables = list(plan.update_variables)
    with strategy.scope():
        if not optimizer.built:
            optimizer.build(update_variables)
        if global_step is None:
            global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        if skipped_steps is None:
            skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
    updating_layers = plan.updating_layers()
    stock_layers = [
        (layer, mode)
        for layer, mode in plan.bn_modes
        if not isinstance(layer, BatchNormalization) and mode.uses_batch_statistics
    ]

    def apply_in_replica(grads, updates):
        optimizer.apply(grads, update_variables)
        updates.apply(layers=updating_layers)

    def apply_or_skip(cross_replica_strategy, finite, grads, updates):
        # Cross-replica context: every replica reported the same verdict.
        finite = cross_replica_strategy.experimental_local_results(finite)[0]

        def apply_all():
            cross_replica_strategy.extended.call_for_each_replica(
                apply_in_replica, args=(grads, updates)
            )
            return tf.constant(True)

        return tf.cond(finite, apply_all, lambda: tf.constant(False))

    def replica_step(images, labels):
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync
        local_count = tf.cast(tf.shape(labels)[0], tf.float32)
        global_count = context.all_reduce(tf.distribute.ReduceOp.SUM, local_count)
        stock_before = [
            (
                layer,
                mode,
                tf.identity(layer.moving_mean.value),
                tf.identity(layer.moving_variance.value),
            )
            for layer, mode in stock_layers
        ]
        with deferred_updates() as updates:
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch([variable.value for variable in update_variables])
                logits = tf.cast(model(images, training=True), tf.float32)
                losses = keras.losses.sparse_categorical_crossentropy(
                    labels, logits, from_logits=True
                )
                # Summed over the replicas (optimizer.apply all-reduces the
                # gradients), this is the global batch's mean loss.
                loss = tf.reduce_sum(losses) / global_count
                if model.losses:
                    extra = tf.add_n([tf.cast(term, tf.float32) for term in model.losses])
                    loss = loss + extra / replicas
            warn_about_repeated_calls(updates.paths)
            grads = tape.gradient(loss, [variable.value for variable in update_variables])
            grads = [
                tf.zeros_like(v.value) if g is None else g for g, v in zip(grads, update_variables)
            ]
            local_finite = tf.reduce_all(
                [tf.reduce_all(tf.math.is_finite(loss))]
                + [tf.reduce_all(tf.math.is_finite(g)) for g in grads]
            )
            non_finite = context.all_reduce(
                tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(local_finite), tf.float32)
            )
            # Each replica's collector travels to its own replica in the branch.
            applied = context.merge_call(
                apply_or_skip, args=(tf.equal(non_finite, 0.0), grads, updates)
            )
            updates.discard()
        for layer, mode, mean, variance in stock_before:
            keep = applied if mode.updates_statistics else tf.constant(False)
            for variable, before in ((layer.moving_mean, mean), (layer.moving_variance, variance)):
                value = tf.where(keep, variable.value, before)
                if replicas > 1:
                    # Stock statistics are per replica (aggregation NONE):
                    # average them so every replica holds the same values.
                    value = context.all_reduce(tf.distribute.ReduceOp.MEAN, value)
                variable.assign(value)
        predicted = tf.argmax(logits, -1, output_type=tf.int32)
        correct = tf.reduce_sum(tf.cast(tf.equal(predicted, tf.cast(labels, tf.int32)), tf.float32))
        total_loss, total_correct = context.all_reduce(tf.distribute.ReduceOp.SUM, [loss, correct])
        return {"loss": total_loss, "accuracy": total_correct / global_count, "applied": applied}

    @tf.function
    def step(images, labels):
        outputs = strategy.run(replica_step, args=(images, labels))
        # Every replica returns the same global values.
        outputs = {
            name: strategy.experimental_local_results(value)[0] for name, value in outputs.items()
        }
        global_step.assign_add(1)
        skipped_steps.assign_add(tf.cast(tf.logical_not(outputs["applied"]), tf.int64))
        return outputs

    return TrainStep(step, plan, global_step, skipped_steps)


def build_eval_step(model: keras.Model) -> Callable:
    """The eval step of `model`, in inference mode.

    Args:
        model: The model; it maps inputs to logits.

    Returns:
        A `tf.function` `(images, labels) -> (sum of losses, number correct,
        count)` of one batch.
    """

    @tf.function
    def step(images, labels):
        logits = tf.cast(model(images, training=False), tf.float32)
        losses = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        predicted = tf.argmax(logits, -1, output_type=tf.int32)
        correct = tf.equal(predicted, tf.cast(labels, tf.int32))
        return (
            tf.reduce_sum(losses),
            tf.reduce_sum(tf.cast(correct, tf.float32)),
            tf.cast(tf.size(labels), tf.float32),
        )

    return step


def evaluate(eval_step: Callable, dataset) -> dict[str, float]:
    """Mean loss and accuracy over `dataset` with an eval step.

    Args:
        eval_step: A step from `build_eval_step`.
        dataset: Iterable of `(images, labels)` batches.

    Returns:
        `{"loss": mean loss, "accuracy": accuracy}` (0 for an empty dataset).
    """
    total_loss = total_correct = total = 0.0
    for images, labels in dataset:
        loss, correct, count = eval_step(images, labels)
        total_loss += float(loss)
        total_correct += float(correct)
        total += float(count)
    return {"loss": total_loss / max(total, 1.0), "accuracy": total_correct / max(total, 1.0)}
