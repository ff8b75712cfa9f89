"""The partial fine-tune trainer behind `train.py`.

One training step (a `tf.function`), the Tiny-YOLO `var_list` + UPDATE_OPS
wiring done right:

1. forward with `training=True` under `tfbn.deferred_updates()`;
2. gradients for the update set only;
3. if the loss and every gradient are finite: apply the gradients, then the
   BN updates of the layers in the update set (and, in `adapt` mode, of the
   frozen ones); otherwise apply neither and count the step as skipped.

BN layers outside the update set follow `frozen_bn_mode`:

* `inference`: the layer runs with `trainable=False` (Keras' rule: moving
  statistics, no update), so its statistics stay bit-identical;
* `batch`: batch statistics, and its pending update is discarded;
* `adapt`: batch statistics, and its update is applied (AdaBN).

Stock `keras.layers.BatchNormalization` layers update their statistics
inside the forward pass; the step snapshots them first and writes the
snapshot back whenever their update must not happen (`batch` mode, or a
skipped step), so they follow the same contract.

The same step runs under every `tf.distribute` strategy (`--strategy`, see
`tfbn.finetune.distribution`): one replica function per replica, the
finite verdict all-reduced so all replicas apply or all skip, and BN
updates applied once per replica step in the replica context. Under
`multi_worker` only the chief writes checkpoints, logs, reports and the
export; the other workers save to throw-away directories.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfbn import data as data_lib
from tfbn import models as models_lib
from tfbn.deferred_updates import deferred_updates
from tfbn.finetune import checkpoint as checkpoint_lib
from tfbn.finetune import distribution, summaries, update_plan
from tfbn.finetune import report as report_lib
from tfbn.finetune.config import TrainConfig
from tfbn.layers.batch_normalization import BatchNormalization

BASELINE_FILE = "bn_baseline.npz"
_UPDATING_MODES = (update_plan.MODE_TRAIN, "adapt")


@dataclasses.dataclass
class TrainResult:
    """What a run did.

    Attributes:
        model: The trained model.
        plan: The update plan.
        global_step: Steps taken (skipped ones included).
        skipped_steps: Steps skipped because the loss or a gradient was not finite.
        resumed_from: The checkpoint resumed, if any.
        restore_report: The partial restore from `init_checkpoint`, if any.
        eval_metrics: The final evaluation.
        bn_rows: The BN report rows.
    """

    model: keras.Model
    plan: update_plan.UpdatePlan
    global_step: int
    skipped_steps: int
    resumed_from: str | None = None
    restore_report: checkpoint_lib.RestoreReport | None = None
    eval_metrics: dict | None = None
    bn_rows: list[dict] | None = None


def make_optimizer(config: TrainConfig, update_variables) -> keras.optimizers.Optimizer:
    """The optimizer and learning-rate schedule of `config`, built for `update_variables`."""
    lr = config.learning_rate
    if config.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, config.train_steps)
    elif config.lr_schedule == "step":
        boundaries = [int(config.train_steps * 0.6), int(config.train_steps * 0.85)]
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            boundaries,
            [config.learning_rate, config.learning_rate * 0.1, config.learning_rate * 0.01],
        )
    decay = config.weight_decay or None
    factories = {
        "sgd": lambda: keras.optimizers.SGD(lr, weight_decay=decay),
        "momentum": lambda: keras.optimizers.SGD(lr, momentum=0.9, weight_decay=decay),
        "adam": lambda: keras.optimizers.Adam(lr, weight_decay=decay),
        "adamw": lambda: keras.optimizers.AdamW(lr, weight_decay=config.weight_decay),
        "rmsprop": lambda: keras.optimizers.RMSprop(lr, weight_decay=decay),
    }
    optimizer = factories[config.optimizer]()
    # Decay kernels only: BN scale/offset and biases are not weights to shrink.
    optimizer.exclude_from_weight_decay(var_list=[v for v in update_variables if len(v.shape) <= 1])
    optimizer.build(list(update_variables))
    return optimizer


def configure_bn_modes(plan: update_plan.UpdatePlan) -> list[tuple]:
    """Sets `trainable` on each BN layer for its mode; returns the old flags.

    Only `inference` mode needs `trainable=False`; the others run with batch
    statistics and the train step decides what happens to their updates.
    """
    previous = []
    for layer, mode in plan.bn_modes:
        previous.append((layer, layer.trainable))
        layer.trainable = mode != "inference"
    return previous


def warn_about_repeated_calls(paths: list[str]) -> list[str]:
    """Warns (at trace time) about BN layers called more than once in a step.

    Each call records and applies one update, so a layer shared by two towers
    or a siamese pair moves its statistics twice per step: its effective
    momentum is `momentum ** calls`. That is often intended, never obvious.

    Returns:
        The repeated layer paths.
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


def make_train_step(
    model, optimizer, plan: update_plan.UpdatePlan, global_step, skipped_steps, strategy=None
):
    """Builds the `tf.function` train step for `plan` (call `configure_bn_modes` first).

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
    statistics (the global-batch ones under `--sync_bn`, else the mean of
    the local ones); stock Keras BN statistics (aggregation NONE) are averaged
    explicitly to the same effect.

    Args:
        model: The model; it must map images to logits. Create it, and its
            optimizer and the step variables, under `strategy.scope()`.
        optimizer: A built optimizer for `plan.update_variables`.
        plan: The update plan.
        global_step: int64 variable incremented by every step.
        skipped_steps: int64 variable incremented by every skipped step.
        strategy: The `tf.distribute.Strategy`; None means the current one
            (the default strategy outside any scope).

    Returns:
        `step(images, labels) -> {"loss", "accuracy", "applied"}`: the global
        batch's mean loss and accuracy, and whether the step was applied.
        Under a strategy with several replicas, pass per-replica values
        (`distribution.distribute_batch`); otherwise plain batches.
    """
    if strategy is None:
        strategy = tf.distribute.get_strategy()
    update_variables = list(plan.update_variables)
    mode_by_layer = {id(layer): mode for layer, mode in plan.bn_modes}
    stock_layers = [
        (layer, mode)
        for layer, mode in plan.bn_modes
        if not isinstance(layer, BatchNormalization) and mode != "inference"
    ]

    def apply_in_replica(grads, updates):
        optimizer.apply(grads, update_variables)
        # Path-level selection of the pending updates to run (exact paths).
        apply_paths = sorted(
            {u.path for u in updates.pending if mode_by_layer.get(id(u.layer)) in _UPDATING_MODES}
        )
        if apply_paths:
            updates.apply(include=[re.escape(path) + "$" for path in apply_paths])

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
                    loss = (
                        loss + tf.add_n([tf.cast(l, tf.float32) for l in model.losses]) / replicas
                    )
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
            keep = applied if mode in _UPDATING_MODES else tf.constant(False)
            for variable, before in ((layer.moving_mean, mean), (layer.moving_variance, variance)):
                value = tf.where(keep, variable.value, before)
                if replicas > 1:
                    # Stock statistics are per replica (aggregation NONE):
                    # average them so every replica holds the same values.
                    value = context.all_reduce(tf.distribute.ReduceOp.MEAN, value)
                variable.assign(value)
        correct = tf.reduce_sum(
            tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
        )
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

    return step


def make_eval_step(model):
    """`tf.function` returning (sum of losses, number correct, count) of a batch in inference mode."""

    @tf.function
    def step(images, labels):
        logits = tf.cast(model(images, training=False), tf.float32)
        losses = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        correct = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels)
        return (
            tf.reduce_sum(losses),
            tf.reduce_sum(tf.cast(correct, tf.float32)),
            tf.cast(tf.size(labels), tf.float32),
        )

    return step


def evaluate(eval_step, dataset) -> dict:
    """Mean loss and accuracy of `dataset` in inference mode."""
    total_loss = total_correct = total = 0.0
    for images, labels in dataset:
        loss, correct, count = eval_step(images, labels)
        total_loss += float(loss)
        total_correct += float(correct)
        total += float(count)
    return {"loss": total_loss / max(total, 1.0), "accuracy": total_correct / max(total, 1.0)}


def describe_sets(plan, restore_selected=None, restore_source=None) -> str:
    """The restore / update / freeze / BN sets as text (what `--dry_run` prints)."""
    lines = []
    if restore_selected is not None:
        lines.append(f"Restore set ({len(restore_selected)} variables from {restore_source}):")
        lines += [f"  {path}" for path in restore_selected]
    lines.append(f"Update set ({len(plan.update_variables)} trainable variables):")
    lines += [f"  {v.path}" for v in plan.update_variables]
    lines.append(f"Frozen ({len(plan.frozen_variables)} variables kept bit-identical):")
    lines += [f"  {v.path}" for v in plan.frozen_variables]
    lines.append(f"BN layers ({len(plan.bn_modes)}):")
    lines += [
        f"  {layer.path}: {'in update set' if mode == update_plan.MODE_TRAIN else 'frozen'}, mode={mode}"
        for layer, mode in plan.bn_modes
    ]
    return "\n".join(lines)


def _say(config: TrainConfig, text: str) -> None:
    if config.verbose:
        print(text, flush=True)


def train(config: TrainConfig, strategy: tf.distribute.Strategy | None = None) -> TrainResult:
    """Runs (or resumes) one training run described by `config`.

    Args:
        config: The validated configuration.
        strategy: The strategy to run under; None builds the one
            `config.strategy` names (after splitting the CPU into
            `config.num_cpu_devices` logical devices). Pass one to share a
            strategy between runs in one process (TensorFlow caches
            collective state per process).

    Returns:
        The `TrainResult`. On a non-chief worker `bn_rows` is None: only the
        chief writes reports.

    Raises:
        ValueError: For patterns that match nothing, checkpoints that do not
            fit, a batch that does not split over the replicas, and unusable
            data.
    """
    if strategy is None:
        distribution.configure_logical_cpus(config.num_cpu_devices)
        strategy = distribution.make_strategy(config.strategy)
    role = distribution.worker_role(strategy)
    if not role.is_chief:
        config = dataclasses.replace(config, verbose=0)
    distribution.replica_batch_size(config.batch_size, strategy)
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    train_split = data_lib.load_split(
        config.dataset, config.train_split, config.image_size, config.data_dir
    )
    eval_name = data_lib.resolve_eval_split(config.dataset, config.eval_split, config.data_dir)
    eval_split = data_lib.load_split(config.dataset, eval_name, config.image_size, config.data_dir)
    with strategy.scope():
        model = models_lib.build_model(
            config.model,
            train_split.num_classes,
            train_split.images.shape[1:],
            bn_momentum=config.bn_momentum,
            bn_epsilon=config.bn_epsilon,
        )
        if config.sync_bn:
            distribution.synchronize_batch_norm(model)
        plan = update_plan.plan_update(
            model,
            config.update_part,
            config.freeze_part,
            config.freeze_batchnorm,
            config.frozen_bn_mode,
        )
        optimizer = make_optimizer(config, plan.update_variables)
        global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
    ckpt = checkpoint_lib.make_checkpoint(model, optimizer, global_step, skipped_steps)
    # Every worker resumes from the chief's checkpoints; each saves through
    # its own manager (see `WorkerRole.checkpoint_dir`).
    manager = tf.train.CheckpointManager(ckpt, config.model_dir, max_to_keep=config.max_to_keep)

    if config.dry_run:
        selected = source = None
        if config.init_checkpoint:
            source = checkpoint_lib.resolve_checkpoint_path(config.init_checkpoint)
            selected = checkpoint_lib.plan_restore(
                [v.path for v in model.variables],
                checkpoint_lib.read_model_variables(source),
                config.restore_part,
                config.restore_exclude,
            )
        print(describe_sets(plan, selected, source), flush=True)
        return TrainResult(model, plan, int(global_step.numpy()), int(skipped_steps.numpy()))

    tf.io.gfile.makedirs(config.model_dir)
    if role.is_chief:
        with open(os.path.join(config.model_dir, "flags.txt"), "w") as stream:
            stream.write(config.to_flagfile())
    result = TrainResult(model, plan, 0, 0)
    result.resumed_from = checkpoint_lib.resume(ckpt, manager)
    bn_layers = [layer for layer, _ in plan.bn_modes]
    baseline_path = os.path.join(config.model_dir, BASELINE_FILE)
    if result.resumed_from:
        _say(config, f"Resumed from {result.resumed_from} at step {int(global_step.numpy())}.")
    elif config.init_checkpoint:
        result.restore_report = checkpoint_lib.restore_partial(
            model, config.init_checkpoint, config.restore_part, config.restore_exclude
        )
        _say(config, result.restore_report.summary())
    if not role.is_chief:
        baseline = None
    elif result.resumed_from and os.path.exists(baseline_path):
        baseline = report_lib.load_snapshot(baseline_path)
    else:
        baseline = report_lib.snapshot(bn_layers)
        report_lib.save_snapshot(baseline_path, baseline)
    saver = manager
    if not role.is_chief:
        saver = tf.train.CheckpointManager(
            ckpt, role.checkpoint_dir(config.model_dir), max_to_keep=1
        )

    previous_trainable = configure_bn_modes(plan)
    _say(
        config,
        f"Training {len(plan.update_variables)} variables under "
        f"{update_plan.known_prefixes([v.path for v in plan.update_variables], depth=1)}; "
        "BN modes: "
        + ", ".join(f"{layer.path}={mode}" for layer, mode in plan.bn_modes)
        + f"; {strategy.num_replicas_in_sync} replica(s) in sync"
        + (", synchronized BN" if config.sync_bn else ""),
    )
    try:
        _run_loop(
            config,
            strategy,
            role,
            model,
            plan,
            optimizer,
            global_step,
            skipped_steps,
            saver,
            train_split,
            eval_split,
            result,
        )
    finally:
        for layer, trainable in previous_trainable:
            layer.trainable = trainable
    if not role.is_chief:
        return result

    result.bn_rows = report_lib.bn_report(plan, baseline)
    report_lib.write_report(os.path.join(config.model_dir, "bn_report.json"), result.bn_rows)
    violations = report_lib.frozen_stats_violations(result.bn_rows)
    _say(
        config, "BN report (changes since the restore):\n" + report_lib.format_table(result.bn_rows)
    )
    _say(
        config,
        "Frozen BN statistics bit-identical: "
        + ("yes" if not violations else f"NO, changed: {violations}"),
    )
    if config.export:
        export_dir = config.resolved_export_dir()
        tf.io.gfile.makedirs(export_dir)
        model.save(os.path.join(export_dir, "model.keras"))
        model.export(os.path.join(export_dir, "saved_model"), verbose=False)
        _say(config, f"Exported {export_dir}/model.keras and {export_dir}/saved_model.")
    return result


class _NoLogger:
    """Stands in for `summaries.RunLogger` on non-chief workers, which log nothing."""

    def scalars(self, split, step, metrics):
        del split, step, metrics

    def bn_histograms(self, step, bn_layers):
        del step, bn_layers

    def close(self):
        pass


def _save(saver, role, step):
    """Saves a checkpoint; a non-chief worker deletes its throw-away copy."""
    saver.save(checkpoint_number=step)
    if not role.is_chief:
        tf.io.gfile.rmtree(saver.directory)


def _run_loop(
    config,
    strategy,
    role,
    model,
    plan,
    optimizer,
    global_step,
    skipped_steps,
    saver,
    train_split,
    eval_split,
    result,
):
    """The step loop: train, log, evaluate (chief), checkpoint (every worker)."""
    train_step = make_train_step(model, optimizer, plan, global_step, skipped_steps, strategy)
    eval_step = make_eval_step(model)
    eval_data = data_lib.eval_batches(eval_split, config.batch_size, config.eval_batches)
    logger = summaries.RunLogger(config.model_dir) if role.is_chief else _NoLogger()
    bn_layers = [layer for layer, _ in plan.bn_modes]
    start = int(global_step.numpy())
    batches = data_lib.train_batches(
        train_split, config.batch_size, config.seed, start, config.train_steps
    )
    progbar = (
        keras.utils.Progbar(config.train_steps, stateful_metrics=["loss", "accuracy", "steps/sec"])
        if config.verbose == 1
        else None
    )
    window_loss, window_accuracy, window_start, window_steps = [], [], time.perf_counter(), 0
    last_saved = None
    try:
        for images, labels in batches:
            outputs = train_step(*distribution.distribute_batch(strategy, images, labels))
            step = int(global_step.numpy())
            window_steps += 1
            if bool(outputs["applied"]):
                window_loss.append(float(outputs["loss"]))
                window_accuracy.append(float(outputs["accuracy"]))
            else:
                _say(
                    config,
                    f"step {step}: non-finite loss or gradients; step skipped "
                    f"(no gradients, no BN updates); skipped so far: {int(skipped_steps.numpy())}.",
                )
            if step % config.summary_interval == 0 or step == config.train_steps:
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "loss": float(np.mean(window_loss)) if window_loss else float("nan"),
                    "accuracy": float(np.mean(window_accuracy))
                    if window_accuracy
                    else float("nan"),
                    "steps_per_sec": window_steps / max(elapsed, 1e-9),
                    "learning_rate": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
                    "skipped_steps": float(skipped_steps.numpy()),
                }
                logger.scalars("train", step, metrics)
                logger.bn_histograms(step, bn_layers)
                if progbar is not None:
                    progbar.update(
                        step,
                        [
                            ("loss", metrics["loss"]),
                            ("accuracy", metrics["accuracy"]),
                            ("steps/sec", metrics["steps_per_sec"]),
                        ],
                    )
                elif config.verbose == 2:
                    print(
                        f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
                        flush=True,
                    )
                window_loss, window_accuracy, window_start, window_steps = (
                    [],
                    [],
                    time.perf_counter(),
                    0,
                )
            evaluate_now = (
                config.eval_interval
                and step % config.eval_interval == 0
                and step != config.train_steps
            )
            if role.is_chief and evaluate_now:
                _log_eval(config, logger, step, evaluate(eval_step, eval_data))
            if step % config.checkpoint_interval == 0:
                _save(saver, role, step)
                last_saved = step
        step = int(global_step.numpy())
        resumed_at_end = result.resumed_from is not None and result.resumed_from.endswith(
            f"-{step}"
        )
        if last_saved != step and not resumed_at_end:
            _save(saver, role, step)
        if role.is_chief:
            result.eval_metrics = evaluate(eval_step, eval_data)
            _log_eval(config, logger, step, result.eval_metrics)
            logger.bn_histograms(step, bn_layers)
    finally:
        logger.close()
    result.global_step = int(global_step.numpy())
    result.skipped_steps = int(skipped_steps.numpy())


def _log_eval(config, logger, step, metrics):
    logger.scalars("eval", step, metrics)
    # After a progress bar, start a new line.
    newline = "\n" if config.verbose == 1 else ""
    _say(
        config,
        f"{newline}eval step {step}: loss={metrics['loss']:.4f} accuracy={metrics['accuracy']:.4f}",
    )
