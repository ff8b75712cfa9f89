"""Training logs: TensorBoard summaries and `metrics.jsonl` in the model_dir.

Scalars (loss, accuracy, learning rate, steps/sec, skipped steps) go to
`<model_dir>/train` and `<model_dir>/eval`; each BN layer's moving mean and
variance go in as histograms, so drifting "frozen" statistics are visible.
Every logged record is also one JSON line in `<model_dir>/metrics.jsonl`;
`truncate_metrics` drops the records of a lost trajectory when a run resumes,
so the file holds one value per step and split.

The events are written with the low-level `tf.summary.write` and the
TensorBoard plugin metadata, so logging needs no `tensorboard` install;
TensorBoard reads them as ordinary scalars and histograms.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.framework import summary_pb2

from tfbn.finetune import run_directory

METRICS_FILE = "metrics.jsonl"
_HISTOGRAM_BUCKETS = 30


def _metadata(plugin_name: str) -> bytes:
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = plugin_name
    return metadata.SerializeToString()


_SCALAR_METADATA = _metadata("scalars")
_HISTOGRAM_METADATA = _metadata("histograms")


def histogram_buckets(values, bucket_count: int = _HISTOGRAM_BUCKETS) -> np.ndarray:
    """`[k, 3]` (left edge, right edge, count) rows: TensorBoard's histogram format.

    Args:
        values: The values to bucket.
        bucket_count: The number of equal-width buckets.

    Returns:
        The buckets; one bucket around the value when all values are equal.
    """
    values = np.asarray(values, np.float64).ravel()
    low, high = float(values.min()), float(values.max())
    if low == high:
        return np.array([[low - 0.5, high + 0.5, float(values.size)]])
    counts, edges = np.histogram(values, bins=bucket_count, range=(low, high))
    return np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)


def truncate_metrics(model_dir: str, step: int, keep_eval_at_step: bool = True) -> int:
    """Drops the `metrics.jsonl` records logged after `step`, rewriting the file atomically.

    A resumed run restarts at its checkpoint's step: records past it belong to
    the trajectory that was lost (the steps after the last checkpoint) and
    would otherwise stand next to the new run's records for the same steps.
    A line cut short by a crash is dropped too.

    Args:
        model_dir: The run directory.
        step: The step resumed (0 for a fresh start).
        keep_eval_at_step: Keep the eval records at `step` itself; pass False
            when the run evaluates at `step` again (it resumed at its end).

    Returns:
        The number of lines dropped.
    """
    path = os.path.join(model_dir, METRICS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as stream:
        lines = stream.read().splitlines()
    kept, unreadable = [], 0
    for line in lines:
        try:
            record = json.loads(line)
            record_step, split = int(record["step"]), record["split"]
        except (ValueError, KeyError, TypeError):
            unreadable += 1
            continue
        if record_step < step or (record_step == step and (keep_eval_at_step or split != "eval")):
            kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        run_directory.write_text_atomically(path, "".join(line + "\n" for line in kept))
        logging.warning(
            "%s: dropped %d records after step %d (the run restarts there; they came "
            "from a run lost after its last checkpoint)%s.",
            path,
            dropped - unreadable,
            step,
            f" and {unreadable} unreadable lines" if unreadable else "",
        )
    return dropped


class RunLogger:
    """Writes one run's TensorBoard events and JSON lines.

    Args:
        model_dir: The run directory.
    """

    def __init__(self, model_dir: str):
        self._writers = {
            split: tf.summary.create_file_writer(os.path.join(model_dir, split))
            for split in ("train", "eval")
        }
        # Open for the logger's lifetime; `close` closes it.
        self._jsonl = open(os.path.join(model_dir, METRICS_FILE), "a")  # noqa: SIM115

    def scalars(self, split: str, step: int, metrics: dict[str, float]) -> None:
        """Logs scalar metrics of `split` at `step`.

        Args:
            split: `"train"` or `"eval"`.
            step: The global step.
            metrics: `{name: value}`.
        """
        with self._writers[split].as_default(step=step):
            for name, value in metrics.items():
                tf.summary.write(
                    name, tf.constant(float(value), tf.float32), metadata=_SCALAR_METADATA
                )
        record = {"step": int(step), "split": split}
        record.update({name: float(value) for name, value in metrics.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def bn_histograms(self, step: int, bn_layers) -> None:
        """Histograms of every BN layer's moving mean and variance.

        Args:
            step: The global step.
            bn_layers: The BN layers.
        """
        with self._writers["train"].as_default(step=step):
            for layer in bn_layers:
                for name in ("moving_mean", "moving_variance"):
                    buckets = histogram_buckets(getattr(layer, name).numpy())
                    tf.summary.write(
                        f"bn/{layer.path}/{name}", buckets, metadata=_HISTOGRAM_METADATA
                    )

    def close(self) -> None:
        """Flushes and closes the writers and the JSON lines file."""
        for writer in self._writers.values():
            writer.close()
        self._jsonl.close()


class MetricsWindow:
    """Loss and accuracy of the applied steps since the last log, and the step rate."""

    def __init__(self):
        self._reset()

    def _reset(self):
        self.losses, self.accuracies, self.steps = [], [], 0
        self.start = time.perf_counter()

    def add(self, loss: float | None, accuracy: float | None) -> None:
        """Counts one step; None values (a skipped step) only count the step.

        Args:
            loss: The step's loss, or None.
            accuracy: The step's accuracy, or None.
        """
        self.steps += 1
        if loss is not None:
            self.losses.append(loss)
            self.accuracies.append(accuracy)

    def flush(self) -> dict[str, float]:
        """The window's mean loss and accuracy and its steps/sec; starts a new window.

        Returns:
            `{"loss", "accuracy", "steps_per_sec"}`; NaN means without an applied step.
        """
        elapsed = time.perf_counter() - self.start
        metrics = {
            "loss": float(np.mean(self.losses)) if self.losses else float("nan"),
            "accuracy": float(np.mean(self.accuracies)) if self.accuracies else float("nan"),
            "steps_per_sec": self.steps / max(elapsed, 1e-9),
        }
        self._reset()
        return metrics
