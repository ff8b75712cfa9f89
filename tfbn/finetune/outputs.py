"""What a training run writes besides its checkpoints, chief and worker versions.

* `Reporter`: the trainer's one channel for user-facing console messages
  (progress bar, one line per log, eval lines, summaries); warnings go
  through absl logging instead.
* `ChiefOutputs`: the chief's console, the run directory's lock, flags.txt and
  run_config.json, TensorBoard/JSON logs, BN baseline and report, export, and
  checkpoints in `model_dir`.
* `WorkerOutputs`: the same interface for the other `multi_worker` workers:
  silent, no files, no lock, checkpoints to a throw-away directory (every
  worker must take part in a save, only the chief's copy is kept).

The `Trainer` picks one of the two once, so its code has no chief branches.
"""

from __future__ import annotations

import os
import zipfile

import keras
import tensorflow as tf
from absl import logging

from tfbn.finetune import checkpoint_files, run_directory, summaries
from tfbn.finetune import report as report_lib
from tfbn.finetune.config import TrainConfig
from tfbn.finetune.update_plan import UpdatePlan

BASELINE_FILE = "bn_baseline.npz"
# Where unreadable checkpoints of a lost trajectory are moved, never deleted.
UNREADABLE_DIR = "unreadable_checkpoints"


class Reporter:
    """Console output of a run, at `verbose` 0 (quiet), 1 (progress bar) or 2 (log lines).

    Args:
        verbose: The verbosity.
    """

    def __init__(self, verbose: int):
        self.verbose = verbose
        self._progbar = None

    def say(self, text: str) -> None:
        """Prints `text` unless quiet.

        Args:
            text: The message.
        """
        if self.verbose:
            print(text, flush=True)

    def always(self, text: str) -> None:
        """Prints `text` whatever the verbosity (what the user asked to see).

        Args:
            text: The message.
        """
        print(text, flush=True)

    def start_progress(self, total_steps: int) -> None:
        """Starts the progress bar (verbose 1).

        Args:
            total_steps: The step the run ends at.
        """
        if self.verbose == 1:
            self._progbar = keras.utils.Progbar(
                total_steps, stateful_metrics=["loss", "accuracy", "steps/sec"]
            )

    def progress(self, step: int, metrics: dict[str, float]) -> None:
        """Shows the train metrics logged at `step`.

        Args:
            step: The global step.
            metrics: `loss`, `accuracy`, `steps_per_sec` and any others.
        """
        if self._progbar is not None:
            shown = [
                ("loss", metrics["loss"]),
                ("accuracy", metrics["accuracy"]),
                ("steps/sec", metrics["steps_per_sec"]),
            ]
            self._progbar.update(step, shown)
        elif self.verbose == 2:
            self.say(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def eval_line(self, step: int, metrics: dict[str, float]) -> None:
        """Shows an evaluation (on a new line after a progress bar).

        Args:
            step: The global step.
            metrics: `loss` and `accuracy`.
        """
        newline = "\n" if self._progbar is not None else ""
        self.say(
            f"{newline}eval step {step}: loss={metrics['loss']:.4f} "
            f"accuracy={metrics['accuracy']:.4f}"
        )


class NullLogger:
    """Stands in for `summaries.RunLogger` where nothing is logged."""

    def scalars(self, split, step, metrics) -> None:
        """Logs nothing.

        Args:
            split: Ignored.
            step: Ignored.
            metrics: Ignored.
        """
        del split, step, metrics

    def bn_histograms(self, step, bn_layers) -> None:
        """Logs nothing.

        Args:
            step: Ignored.
            bn_layers: Ignored.
        """
        del step, bn_layers

    def close(self) -> None:
        """Nothing to close."""


class ChiefOutputs:
    """The chief's outputs: everything a run leaves in its `model_dir`.

    Args:
        config: The run configuration.
    """

    evaluates = True

    def __init__(self, config: TrainConfig):
        self.config = config
        self.reporter = Reporter(config.verbose)

    def lock(self) -> run_directory.RunDirectoryLock:
        """Takes the run directory's exclusive lock (see `run_directory.lock_run_directory`).

        Returns:
            The held lock; release it when the run ends.

        Raises:
            run_directory.RunDirectoryInUseError: If another run holds it.
        """
        return run_directory.lock_run_directory(self.config.model_dir)

    def check_resume_flags(self, checkpoint: str) -> dict[str, tuple]:
        """Refuses a resume with changed trajectory flags (unless allowed).

        Args:
            checkpoint: The checkpoint about to be resumed.

        Returns:
            The accepted changes, `{field: (saved, new)}`.

        Raises:
            ValueError: If flags changed and `allow_changed_flags` is not set.
        """
        if run_directory.read_run_record(self.config.model_dir) is None:
            logging.warning(
                "%s has no %s (written by an older tfbn), so the flags of this resume "
                "cannot be compared with the saved ones; it will be written now.",
                self.config.model_dir,
                run_directory.RUN_CONFIG_FILE,
            )
        changes = run_directory.check_resume_flags(self.config.model_dir, self.config, checkpoint)
        if changes:
            logging.warning(
                "Resuming %s with changed flags (allow_changed_flags): %s.",
                checkpoint,
                run_directory.describe_changes(changes),
            )
        return changes

    def record_start(
        self,
        search: checkpoint_files.CheckpointSearch,
        resumed_step: int | None,
        changes: dict[str, tuple],
    ) -> None:
        """Puts the run directory in order once every check of the start has passed.

        Moves unreadable checkpoints newer than the resumed one aside (the
        new trajectory would overwrite them), rewrites TensorFlow's state
        file when it did not name the resumed checkpoint, writes flags.txt
        and run_config.json, and drops the `metrics.jsonl` records of the
        lost trajectory (after the resumed step).

        Args:
            search: What `checkpoint_files.find_checkpoints` found in `model_dir`.
            resumed_step: The step resumed, or None for a fresh start.
            changes: The flag changes accepted (`check_resume_flags`).
        """
        model_dir = self.config.model_dir
        if search.unreadable:
            aside = os.path.join(model_dir, UNREADABLE_DIR)
            for prefix in search.unreadable:
                checkpoint_files.set_aside(prefix, aside)
            logging.warning(
                "The newest checkpoint in %s is unreadable (%s); resumed from the previous "
                "one, %s. The unreadable files were moved to %s.",
                model_dir,
                search.describe_unreadable(),
                search.latest,
                aside,
            )
        if search.latest is not None and search.state_problem:
            checkpoint_files.write_state_file(search)
            if not search.unreadable:
                logging.warning(
                    "%s; resumed from the newest readable checkpoint in its files, %s, "
                    "and rewrote the state file.",
                    search.state_problem,
                    search.latest,
                )
        run_directory.record_start(model_dir, self.config, resumed_step, changes)
        step = resumed_step or 0
        summaries.truncate_metrics(
            model_dir, step, keep_eval_at_step=step < self.config.train_steps
        )

    def baseline(self, bn_layers, resumed: bool) -> report_lib.Snapshot:
        """The BN state the report compares with: saved after the restore, reloaded on resume.

        Args:
            bn_layers: The BN layers.
            resumed: Whether the run resumed (then an existing baseline is kept).

        Returns:
            The snapshot.
        """
        path = os.path.join(self.config.model_dir, BASELINE_FILE)
        if resumed and os.path.exists(path):
            try:
                return report_lib.load_snapshot(path)
            except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
                # It holds the state right after the first start's restore, which
                # a resume cannot rebuild; only the user may give it up.
                raise ValueError(
                    f"The BN report baseline {path} in `model_dir` is unreadable "
                    f"({type(error).__name__}: {error}). Restore it from a backup, or "
                    "delete it to compare the BN report with the statistics at the "
                    "resumed step instead of the start of the run."
                ) from None
        values = report_lib.snapshot(bn_layers)
        # Written under a temporary name first: a crash never leaves half a baseline.
        temporary = path + ".tmp.npz"
        report_lib.save_snapshot(temporary, values)
        os.replace(temporary, path)
        return values

    def logger(self) -> summaries.RunLogger:
        """Opens the TensorBoard and metrics.jsonl logger of the run.

        Returns:
            The `summaries.RunLogger`; close it at the end.
        """
        return summaries.RunLogger(self.config.model_dir)

    def save_checkpoint(self, manager: tf.train.CheckpointManager, step: int) -> None:
        """Saves a checkpoint numbered `step` through the run's manager.

        Args:
            manager: The manager of `model_dir`.
            step: The global step.
        """
        manager.save(checkpoint_number=step)

    def write_report(self, plan: UpdatePlan, baseline: report_lib.Snapshot) -> list[dict]:
        """Writes `bn_report.json` and prints the report and the frozen-statistics verdict.

        Args:
            plan: The update plan.
            baseline: The snapshot taken right after the restore.

        Returns:
            The report rows.
        """
        rows = report_lib.bn_report(plan, baseline)
        report_lib.write_report(os.path.join(self.config.model_dir, "bn_report.json"), rows)
        self.reporter.say(
            "BN report (changes since the restore):\n" + report_lib.format_table(rows)
        )
        self.reporter.say(report_lib.verdict_line(rows))
        return rows

    def export(self, model: keras.Model) -> str | None:
        """Saves `model.keras` and a SavedModel when `config.export` is set.

        Args:
            model: The trained model.

        Returns:
            The export directory, or None when export is off.
        """
        if not self.config.export:
            return None
        export_dir = self.config.resolved_export_dir()
        tf.io.gfile.makedirs(export_dir)
        model.save(os.path.join(export_dir, "model.keras"))
        model.export(os.path.join(export_dir, "saved_model"), verbose=False)
        self.reporter.say(f"Exported {export_dir}/model.keras and {export_dir}/saved_model.")
        return export_dir


class WorkerOutputs:
    """A non-chief worker's outputs: silent, no files, throw-away checkpoints.

    Args:
        save_dir: The worker's throw-away checkpoint directory.
    """

    evaluates = False

    def __init__(self, save_dir: str):
        self.save_dir = save_dir
        self.reporter = Reporter(0)

    def lock(self) -> None:
        """Takes no lock: the chief holds the run directory's.

        Returns:
            None.
        """

    def check_resume_flags(self, checkpoint: str) -> dict:
        """Checks nothing: the chief compares the flags.

        Args:
            checkpoint: Ignored.

        Returns:
            No changes.
        """
        del checkpoint
        return {}

    def record_start(self, search, resumed_step, changes) -> None:
        """Writes nothing.

        Args:
            search: Ignored.
            resumed_step: Ignored.
            changes: Ignored.
        """
        del search, resumed_step, changes

    def baseline(self, bn_layers, resumed: bool) -> None:
        """Keeps no baseline (there is no report).

        Args:
            bn_layers: Ignored.
            resumed: Ignored.

        Returns:
            None.
        """
        del bn_layers, resumed

    def logger(self) -> NullLogger:
        """A logger that logs nothing.

        Returns:
            A `NullLogger`.
        """
        return NullLogger()

    def save_checkpoint(self, manager: tf.train.CheckpointManager, step: int) -> None:
        """Takes part in the save (collectively), then deletes the throw-away copy.

        Args:
            manager: The manager of `model_dir`; its checkpoint is saved.
            step: The global step.
        """
        throwaway = tf.train.CheckpointManager(manager.checkpoint, self.save_dir, max_to_keep=1)
        throwaway.save(checkpoint_number=step)
        tf.io.gfile.rmtree(self.save_dir)

    def write_report(self, plan, baseline) -> None:
        """Writes no report.

        Args:
            plan: Ignored.
            baseline: Ignored.

        Returns:
            None.
        """
        del plan, baseline

    def export(self, model) -> None:
        """Exports nothing.

        Args:
            model: Ignored.

        Returns:
            None.
        """
        del model
