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
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import List, Optional

import keras
import numpy as np
import tensorflow as tf

from tfbn import data as data_lib
from tfbn import models as models_lib
from tfbn.config import TrainConfig
from tfbn.deferred_updates import deferred_updates
from tfbn.finetune import checkpoint as checkpoint_lib
from tfbn.finetune import report as report_lib
from tfbn.finetune import scopes
from tfbn.finetune import summaries
from tfbn.layers.batch_normalization import BatchNormalization

BASELINE_FILE = "bn_baseline.npz"
_UPDATING_MODES = (scopes.MODE_TRAIN, "adapt")


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
    plan: scopes.UpdatePlan
    global_step: int
    skipped_steps: int
    resumed_from: Optional[str] = None
    restore_report: Optional[checkpoint_lib.RestoreReport] = None
    eval_metrics: Optional[dict] = None
    bn_rows: Optional[List[dict]] = None


def make_optimizer(config: TrainConfig, update_variables) -> keras.optimizers.Optimizer:
    """The optimizer and learning-rate schedule of `config`, built for `update_variables`."""
    lr = config.learning_rate
    if config.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, config.train_steps)
    elif config.lr_schedule == "step":
        boundaries = [int(config.train_steps * 0.6), int(config.train_steps * 0.85)]
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            boundaries, [config.learning_rate, config.learning_rate * 0.1, config.learning_rate * 0.01]
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
    optimizer.exclude_from_weight_decay(
        var_list=[v for v in update_variables if len(v.shape) <= 1]
    )
    optimizer.build(list(update_variables))
    return optimizer


def configure_bn_modes(plan: scopes.UpdatePlan) -> List[tuple]:
    """Sets `trainable` on each BN layer for its mode; returns the old flags.

    Only `inference` mode needs `trainable=False`; the others run with batch
    statistics and the train step decides what happens to their updates.
    """
    previous = []
    for layer, mode in plan.bn_modes:
        previous.append((layer, layer.trainable))
        layer.trainable = mode != "inference"
    return previous


def make_train_step(model, optimizer, plan: scopes.UpdatePlan, global_step, skipped_steps):
    """Builds the `tf.function` train step for `plan` (call `configure_bn_modes` first).

    Args:
        model: The model; it must map images to logits.
        optimizer: A built optimizer for `plan.update_variables`.
        plan: The update plan.
        global_step: int64 variable incremented by every step.
        skipped_steps: int64 variable incremented by every skipped step.

    Returns:
        `step(images, labels) -> {"loss", "accuracy", "applied"}`.
    """
    update_variables = list(plan.update_variables)
    mode_by_layer = {id(layer): mode for layer, mode in plan.bn_modes}
    stock_layers = [
        (layer, mode)
        for layer, mode in plan.bn_modes
        if not isinstance(layer, BatchNormalization) and mode != "inference"
    ]

    @tf.function
    def step(images, labels):
        stock_before = [
            (layer, mode, tf.identity(layer.moving_mean.value), tf.identity(layer.moving_variance.value))
            for layer, mode in stock_layers
        ]
        with deferred_updates() as updates:
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch([variable.value for variable in update_variables])
                logits = tf.cast(model(images, training=True), tf.float32)
                loss = tf.reduce_mean(
                    keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
                )
                if model.losses:
                    loss = loss + tf.add_n([tf.cast(l, tf.float32) for l in model.losses])
            grads = tape.gradient(loss, [variable.value for variable in update_variables])
            grads = [tf.zeros_like(v.value) if g is None else g for g, v in zip(grads, update_variables)]
            finite = tf.reduce_all(
                [tf.reduce_all(tf.math.is_finite(loss))] + [tf.reduce_all(tf.math.is_finite(g)) for g in grads]
            )
            # Path-level selection of the pending updates to run (exact paths).
            apply_paths = sorted(
                {u.path for u in updates.pending if mode_by_layer.get(id(u.layer)) in _UPDATING_MODES}
            )

            def apply_all():
                optimizer.apply(grads, update_variables)
                if apply_paths:
                    updates.apply(include=[re.escape(path) + "$" for path in apply_paths])
                return tf.constant(True)

            applied = tf.cond(finite, apply_all, lambda: tf.constant(False))
            updates.discard()
        for layer, mode, mean, variance in stock_before:
            keep = applied if mode in _UPDATING_MODES else tf.constant(False)
            layer.moving_mean.assign(tf.where(keep, layer.moving_mean.value, mean))
            layer.moving_variance.assign(tf.where(keep, layer.moving_variance.value, variance))
        global_step.assign_add(1)
        skipped_steps.assign_add(tf.cast(tf.logical_not(applied), tf.int64))
        accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
        return {"loss": loss, "accuracy": accuracy, "applied": applied}

    return step


def make_eval_step(model):
    """`tf.function` returning (sum of losses, number correct, count) of a batch in inference mode."""

    @tf.function
    def step(images, labels):
        logits = tf.cast(model(images, training=False), tf.float32)
        losses = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        correct = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels)
        return tf.reduce_sum(losses), tf.reduce_sum(tf.cast(correct, tf.float32)), tf.cast(tf.size(labels), tf.float32)

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
        f"  {layer.path}: {'in update set' if mode == scopes.MODE_TRAIN else 'frozen'}, mode={mode}"
        for layer, mode in plan.bn_modes
    ]
    return "\n".join(lines)


def _say(config: TrainConfig, text: str) -> None:
    if config.verbose:
        print(text, flush=True)


def train(config: TrainConfig) -> TrainResult:
    """Runs (or resumes) one training run described by `config`.

    Args:
        config: The validated configuration.

    Returns:
        The `TrainResult`.

    Raises:
        ValueError: For patterns that match nothing, checkpoints that do not
            fit, and unusable data.
    """
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    train_split = data_lib.load_split(config.dataset, config.train_split, config.image_size, config.data_dir)
    eval_name = data_lib.resolve_eval_split(config.dataset, config.eval_split, config.data_dir)
    eval_split = data_lib.load_split(config.dataset, eval_name, config.image_size, config.data_dir)
    model = models_lib.build_model(
        config.model,
        train_split.num_classes,
        train_split.images.shape[1:],
        bn_momentum=config.bn_momentum,
        bn_epsilon=config.bn_epsilon,
    )
    plan = scopes.plan_update(
        model, config.update_part, config.freeze_part, config.freeze_batchnorm, config.frozen_bn_mode
    )
    optimizer = make_optimizer(config, plan.update_variables)
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
    ckpt = checkpoint_lib.make_checkpoint(model, optimizer, global_step, skipped_steps)
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
    if result.resumed_from and os.path.exists(baseline_path):
        baseline = report_lib.load_snapshot(baseline_path)
    else:
        baseline = report_lib.snapshot(bn_layers)
        report_lib.save_snapshot(baseline_path, baseline)

    previous_trainable = configure_bn_modes(plan)
    _say(config, f"Training {len(plan.update_variables)} variables under "
                 f"{scopes.known_prefixes([v.path for v in plan.update_variables], depth=1)}; "
                 "BN modes: " + ", ".join(f"{layer.path}={mode}" for layer, mode in plan.bn_modes))
    try:
        _run_loop(config, model, plan, optimizer, global_step, skipped_steps, manager, train_split, eval_split, result)
    finally:
        for layer, trainable in previous_trainable:
            layer.trainable = trainable

    result.bn_rows = report_lib.bn_report(plan, baseline)
    report_lib.write_report(os.path.join(config.model_dir, "bn_report.json"), result.bn_rows)
    violations = report_lib.frozen_stats_violations(result.bn_rows)
    _say(config, "BN report (changes since the restore):\n" + report_lib.format_table(result.bn_rows))
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


def _run_loop(config, model, plan, optimizer, global_step, skipped_steps, manager, train_split, eval_split, result):
    """The step loop: train, log, evaluate, checkpoint."""
    train_step = make_train_step(model, optimizer, plan, global_step, skipped_steps)
    eval_step = make_eval_step(model)
    eval_data = data_lib.eval_batches(eval_split, config.batch_size, config.eval_batches)
    logger = summaries.RunLogger(config.model_dir)
    bn_layers = [layer for layer, _ in plan.bn_modes]
    start = int(global_step.numpy())
    batches = data_lib.train_batches(train_split, config.batch_size, config.seed, start, config.train_steps)
    progbar = keras.utils.Progbar(config.train_steps, stateful_metrics=["loss", "accuracy", "steps/sec"]) if config.verbose == 1 else None
    window_loss, window_accuracy, window_start, window_steps = [], [], time.perf_counter(), 0
    try:
        for images, labels in batches:
            outputs = train_step(images, labels)
            step = int(global_step.numpy())
            window_steps += 1
            if bool(outputs["applied"]):
                window_loss.append(float(outputs["loss"]))
                window_accuracy.append(float(outputs["accuracy"]))
            else:
                _say(config, f"step {step}: non-finite loss or gradients; step skipped "
                             f"(no gradients, no BN updates); skipped so far: {int(skipped_steps.numpy())}.")
            if step % config.summary_interval == 0 or step == config.train_steps:
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "loss": float(np.mean(window_loss)) if window_loss else float("nan"),
                    "accuracy": float(np.mean(window_accuracy)) if window_accuracy else float("nan"),
                    "steps_per_sec": window_steps / max(elapsed, 1e-9),
                    "learning_rate": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
                    "skipped_steps": float(skipped_steps.numpy()),
                }
                logger.scalars("train", step, metrics)
                logger.bn_histograms(step, bn_layers)
                if progbar is not None:
                    progbar.update(step, [("loss", metrics["loss"]), ("accuracy", metrics["accuracy"]),
                                          ("steps/sec", metrics["steps_per_sec"])])
                elif config.verbose == 2:
                    print(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
                window_loss, window_accuracy, window_start, window_steps = [], [], time.perf_counter(), 0
            if config.eval_interval and step % config.eval_interval == 0 and step != config.train_steps:
                _log_eval(config, logger, step, evaluate(eval_step, eval_data))
            if step % config.checkpoint_interval == 0:
                manager.save(checkpoint_number=step)
        step = int(global_step.numpy())
        if manager.latest_checkpoint is None or not manager.latest_checkpoint.endswith(f"-{step}"):
            manager.save(checkpoint_number=step)
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
    _say(config, f"{newline}eval step {step}: loss={metrics['loss']:.4f} accuracy={metrics['accuracy']:.4f}")
