"""The partial fine-tune trainer behind `train.py`: the `Trainer` object.

`Trainer(config, strategy)` owns one run: `initialize` builds the data, the
model, the update plan, the optimizer, the train step
(`tfbn.finetune.train_step`) and the checkpoint; `train` resumes (or
partially restores) and runs the steps, logging and checkpointing along the
way; `evaluate`, `write_report` (the BN report) and `export` finish it.
The module-level `train(config, strategy)` does all of that in order.

Under `multi_worker` only the chief locks `model_dir` and writes console
output, flags.txt and run_config.json, logs, the BN report and the export;
the other workers save their checkpoints to throw-away directories. That
choice is made once, when the `Trainer` is created, by picking the chief's
or a worker's output objects; the rest of the code does not ask who it is.
"""

from __future__ import annotations

import contextlib
import dataclasses

import keras
import tensorflow as tf

from tfbn import data as data_lib
from tfbn import models as models_lib
from tfbn.finetune import checkpoint as checkpoint_lib
from tfbn.finetune import (
    checkpoint_files,
    distribution,
    optimizers,
    partial_restore,
    patterns,
    skip_limit,
    summaries,
    train_step,
)
from tfbn.finetune.config import TrainConfig
from tfbn.finetune.outputs import ChiefOutputs, Reporter, WorkerOutputs
from tfbn.finetune.update_plan import UpdatePlan, plan_update
from tfbn.layers import introspection


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
    plan: UpdatePlan
    global_step: int
    skipped_steps: int
    resumed_from: str | None = None
    restore_report: partial_restore.RestoreReport | None = None
    eval_metrics: dict | None = None
    bn_rows: list[dict] | None = None


class Trainer:
    """One training (or fine-tune) run described by a `TrainConfig`.

    Typical use: `Trainer(config).run()`, or step by step:
    `trainer.initialize()`, `trainer.train()`, `trainer.evaluate()`,
    `trainer.write_report()`, `trainer.export()`.

    Args:
        config: The validated configuration.
        strategy: The strategy to run under; None builds the one
            `config.strategy` names (after splitting the CPU into
            `config.num_cpu_devices` logical devices). Pass one to share a
            strategy between runs in one process (TensorFlow caches
            collective state per process).

    Attributes:
        config: The configuration.
        strategy: The `tf.distribute.Strategy`.
        outputs: `ChiefOutputs` on the chief, `WorkerOutputs` elsewhere.
        reporter: The console channel (`outputs.reporter`).
        model, plan, optimizer, step, checkpoint: Built by `initialize`
            (`step` is a `train_step.TrainStep` holding the global and
            skipped step counters).
        manager: The `tf.train.CheckpointManager` of `model_dir`, created
            by `train` once the resume or restore has been checked.
        result: The `TrainResult` being filled.

    Raises:
        ValueError: If the batch does not split evenly over the replicas.
    """

    def __init__(self, config: TrainConfig, strategy: tf.distribute.Strategy | None = None):
        if strategy is None:
            distribution.configure_logical_cpus(config.num_cpu_devices)
            strategy = distribution.make_strategy(config.strategy)
        distribution.replica_batch_size(config.batch_size, strategy)
        self.config = config
        self.strategy = strategy
        role = distribution.worker_role(strategy)
        # The one chief / worker decision of the run.
        self.outputs = (
            ChiefOutputs(config)
            if role.is_chief
            else WorkerOutputs(role.checkpoint_dir(config.model_dir))
        )
        self.reporter: Reporter = self.outputs.reporter
        self.train_split = None
        self.eval_split = None
        self.model = None
        self.plan = None
        self.optimizer = None
        self.step = None
        self.checkpoint = None
        self.manager = None
        self.result = None
        self._baseline = None
        self._lock_held = False

    # --------------------------------------------------------------- setup

    def initialize(self) -> None:
        """Loads the data and builds the model, plan, optimizer, step and checkpoint.

        Writes nothing and restores nothing (see `train`).

        Raises:
            ValueError: For unusable data, an unknown model, or update
                patterns that match nothing.
        """
        config = self.config
        keras.utils.set_random_seed(config.seed)
        tf.config.experimental.enable_op_determinism()
        # A saved `.keras` model decides the image size: the images are resized to its input.
        image_size = models_lib.input_image_size(config.model, config.image_size)
        self.train_split = data_lib.load_split(
            config.dataset, config.train_split, image_size, config.data_dir
        )
        eval_name = data_lib.resolve_eval_split(config.dataset, config.eval_split, config.data_dir)
        self.eval_split = data_lib.load_split(
            config.dataset, eval_name, image_size, config.data_dir
        )
        with self.strategy.scope():
            self.model = models_lib.build_model(
                config.model,
                self.train_split.num_classes,
                self.train_split.image_shape,
                bn_momentum=config.bn_momentum,
                bn_epsilon=config.bn_epsilon,
                dataset=config.dataset,
            )
            if config.sync_bn:
                distribution.synchronize_batch_norm(self.model)
            self.plan = plan_update(
                self.model,
                config.update_part,
                config.freeze_part,
                config.freeze_batchnorm,
                config.frozen_bn_mode,
            )
            self.optimizer = optimizers.make_optimizer(config, self.plan.update_variables)
        self.step = train_step.build_train_step(
            self.model, self.optimizer, self.plan, self.strategy
        )
        self._eval_step = train_step.build_eval_step(self.model)
        self.checkpoint = checkpoint_lib.make_checkpoint(
            self.model, self.optimizer, self.step.global_step, self.step.skipped_steps
        )
        # Every worker resumes from the chief's checkpoints in `model_dir`; the
        # manager that saves them is created once the start has been checked
        # (`_restore`), and each worker saves through its outputs.
        self.manager = None
        self.result = TrainResult(self.model, self.plan, 0, 0)

    def describe(self) -> str:
        """The restore, update, frozen and BN sets of this run, as text.

        Returns:
            The restore set (when `init_checkpoint` is set), then the update,
            frozen and BN sets by the nested paths the patterns matched.

        Raises:
            ValueError: If a restore pattern matches nothing or a selected
                variable is missing from the checkpoint.
        """
        lines = []
        if models_lib.is_model_file(self.config.model):
            size = self.train_split.image_shape[0]
            lines.append(
                f"Model {self.config.model}: architecture and weights from the file; images "
                f"resized to {size}x{size}, its input size."
            )
        if self.config.init_checkpoint:
            source, values = partial_restore.read_restore_source(
                self.config.init_checkpoint, self.model
            )
            selected = partial_restore.plan_restore(
                list(introspection.nested_variable_paths(self.model)),
                values,
                self.config.restore_part,
                self.config.restore_exclude,
            )
            lines.append(f"Restore set ({len(selected)} variables from {source}):")
            lines += [f"  {path}" for path in selected]
        lines.append(self.plan.describe())
        return "\n".join(lines)

    def _restore(self) -> None:
        """Resumes from `model_dir`, else restores `init_checkpoint` partially.

        Every check (a readable checkpoint, unchanged trajectory flags, a
        matching checkpoint, a readable BN baseline) passes before the run
        directory is written to (`outputs.record_start`).
        """
        config, result = self.config, self.result
        search = checkpoint_files.find_checkpoints(config.model_dir)
        if search.latest is None and search.unreadable:
            raise ValueError(
                f"`model_dir` {config.model_dir} holds checkpoints but none is readable: "
                f"{search.describe_unreadable()}. Restore the files from a backup, move "
                "them out of the directory to start this run over, or pass another "
                "`model_dir`."
            )
        changes = {}
        if search.latest is not None:
            changes = self.outputs.check_resume_flags(search.latest)
            result.resumed_from = checkpoint_lib.resume(self.checkpoint, search.latest)
            self.reporter.say(
                f"Resumed from {result.resumed_from} at step {int(self.step.global_step.numpy())}."
            )
        elif config.init_checkpoint:
            result.restore_report = partial_restore.restore_partial(
                self.model, config.init_checkpoint, config.restore_part, config.restore_exclude
            )
            self.reporter.say(result.restore_report.summary())
        bn_layers = [layer for layer, _ in self.plan.bn_modes]
        self._baseline = self.outputs.baseline(bn_layers, resumed=bool(result.resumed_from))
        resumed_step = int(self.step.global_step.numpy()) if result.resumed_from else None
        self.outputs.record_start(search, resumed_step, changes)
        # Created over the repaired state file, so it counts the checkpoints
        # found in `max_to_keep` and never renumbers over them.
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, config.model_dir, max_to_keep=config.max_to_keep
        )

    @contextlib.contextmanager
    def _run_directory_locked(self):
        """Holds the run directory's lock (the chief's) for the enclosed work.

        Re-entrant: `run` holds it across `train`, `write_report` and
        `export`; `train` called alone holds it while it trains.
        """
        if self._lock_held:
            yield
            return
        lock = self.outputs.lock()
        self._lock_held = True
        try:
            yield
        finally:
            self._lock_held = False
            if lock is not None:
                lock.release()

    # ------------------------------------------------------------ training

    def train(self) -> TrainResult:
        """Resumes or restores, then trains up to `train_steps` and evaluates.

        Calls `initialize` first when it has not run yet. The BN layers run
        in their plan's modes during each step only (`train_step.bn_modes`).

        Returns:
            The `TrainResult` so far (`bn_rows` is filled by `write_report`).

        Raises:
            ValueError: If the checkpoint to resume does not match this run
                (or its flags changed without `allow_changed_flags`), no
                checkpoint in `model_dir` is readable, or the partial
                restore does not fit the model.
            run_directory.RunDirectoryInUseError: If another run holds
                `model_dir` (a `ValueError` too).
        """
        with self._run_directory_locked():
            return self._train()

    def _train(self) -> TrainResult:
        if self.model is None:
            self.initialize()
        self._restore()
        plan, strategy = self.plan, self.strategy
        self.reporter.say(
            f"Training {len(plan.update_variables)} variables under "
            f"{patterns.known_prefixes([plan.path(v) for v in plan.update_variables], depth=1)}; "
            "BN modes: "
            + ", ".join(f"{plan.path(layer)}={mode}" for layer, mode in plan.bn_modes)
            + f"; {strategy.num_replicas_in_sync} replica(s) in sync"
            + (", synchronized BN" if self.config.sync_bn else "")
        )
        logger = self.outputs.logger()
        try:
            self._run_steps(logger)
            step = int(self.step.global_step.numpy())
            if self.outputs.evaluates:
                self.result.eval_metrics = self.evaluate()
                self._log_eval(logger, step, self.result.eval_metrics)
            logger.bn_histograms(step, [layer for layer, _ in plan.bn_modes])
        finally:
            logger.close()
        self.result.global_step = int(self.step.global_step.numpy())
        self.result.skipped_steps = int(self.step.skipped_steps.numpy())
        return self.result

    def _run_steps(self, logger) -> None:
        """The step loop: train, log, evaluate along the way, checkpoint."""
        config, step_counter = self.config, self.step.global_step
        start = int(step_counter.numpy())
        batches = data_lib.train_batches(
            self.train_split,
            config.batch_size,
            config.seed,
            start,
            config.train_steps,
            rows=distribution.local_batch_rows(self.strategy, config.batch_size),
        )
        self.reporter.start_progress(config.train_steps)
        window = summaries.MetricsWindow()
        streak = skip_limit.SkipStreak(config.max_consecutive_skipped_steps)
        last_saved = None
        for images, labels in batches:
            outputs = self.step(*distribution.distribute_batch(self.strategy, images, labels))
            step = int(step_counter.numpy())
            if bool(outputs["applied"]):
                window.add(float(outputs["loss"]), float(outputs["accuracy"]))
                streak.add(step, applied=True)
            else:
                window.add(None, None)
                self.reporter.say(
                    f"step {step}: non-finite loss or gradients; step skipped (no gradients, "
                    f"no BN updates); skipped so far: {int(self.step.skipped_steps.numpy())}."
                )
                # Every worker sees the same verdict, so all of them stop here together.
                streak.add(step, applied=False, learning_rate=config.learning_rate)
            if step % config.summary_interval == 0 or step == config.train_steps:
                metrics = window.flush()
                metrics["learning_rate"] = float(
                    keras.ops.convert_to_numpy(self.optimizer.learning_rate)
                )
                metrics["skipped_steps"] = float(self.step.skipped_steps.numpy())
                logger.scalars("train", step, metrics)
                logger.bn_histograms(step, [layer for layer, _ in self.plan.bn_modes])
                self.reporter.progress(step, metrics)
            periodic_eval = config.eval_interval and step % config.eval_interval == 0
            if self.outputs.evaluates and periodic_eval and step != config.train_steps:
                self._log_eval(logger, step, self.evaluate())
            if step % config.checkpoint_interval == 0:
                self._save(step)
                last_saved = step
        step = int(step_counter.numpy())
        resumed = self.result.resumed_from
        resumed_at_end = resumed is not None and resumed.endswith(f"-{step}")
        if last_saved != step and not resumed_at_end:
            self._save(step)

    def _save(self, step: int) -> None:
        self.outputs.save_checkpoint(self.manager, step)

    def _log_eval(self, logger, step: int, metrics: dict) -> None:
        logger.scalars("eval", step, metrics)
        self.reporter.eval_line(step, metrics)

    # ------------------------------------------------------- finishing up

    def evaluate(self) -> dict[str, float]:
        """Mean loss and accuracy on the eval split, in inference mode.

        Returns:
            `{"loss": ..., "accuracy": ...}`.
        """
        dataset = data_lib.eval_batches(
            self.eval_split, self.config.batch_size, self.config.eval_batches
        )
        return train_step.evaluate(self._eval_step, dataset)

    def write_report(self) -> list[dict] | None:
        """Writes `bn_report.json` and prints the BN report (chief only).

        Returns:
            The BN report rows; None on a non-chief worker, which writes
            no report.
        """
        self.result.bn_rows = self.outputs.write_report(self.plan, self._baseline)
        return self.result.bn_rows

    def export(self) -> str | None:
        """Exports `model.keras` and a SavedModel when `config.export` is set (chief only).

        Returns:
            The export directory, or None when nothing was exported.
        """
        return self.outputs.export(self.model)

    def run(self) -> TrainResult:
        """Initializes, then either prints the sets (`dry_run`) or trains, reports, exports.

        Returns:
            The `TrainResult`. On a non-chief worker `bn_rows` is None.
        """
        if self.config.dry_run:
            self.initialize()
            self.reporter.always(self.describe())
            return self.result
        # Locked first: a second run on the same directory stops at once.
        with self._run_directory_locked():
            self.initialize()
            self.train()
            self.write_report()
            self.export()
        return self.result


def train(config: TrainConfig, strategy: tf.distribute.Strategy | None = None) -> TrainResult:
    """Runs (or resumes) one training run described by `config`.

    Args:
        config: The validated configuration.
        strategy: See `Trainer`.

    Returns:
        The `TrainResult`. On a non-chief worker `bn_rows` is None: only the
        chief writes reports.

    Raises:
        ValueError: For patterns that match nothing, checkpoints that do not
            fit, a batch that does not split over the replicas, and unusable
            data; `run_directory.RunDirectoryInUseError` (a `ValueError`) when
            another run holds `model_dir`.
        skip_limit.NonFiniteTrainingError: When `max_consecutive_skipped_steps` steps in
            a row were skipped as non-finite.
    """
    return Trainer(config, strategy).run()
