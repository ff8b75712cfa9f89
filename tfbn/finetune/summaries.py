"""Training logs: TensorBoard summaries and `metrics.jsonl` in the model_dir.

Scalars (loss, accuracy, learning rate, steps/sec, skipped steps) go to
`<model_dir>/train` and `<model_dir>/eval`; each BN layer's moving mean and
variance go in as histograms, so drifting "frozen" statistics are visible.
Every logged record is also one JSON line in `<model_dir>/metrics.jsonl`.

The events are written with the low-level `tf.summary.write` and the
TensorBoard plugin metadata, so logging needs no `tensorboard` install;
TensorBoard reads them as ordinary scalars and histograms.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

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
        self._jsonl = open(os.path.join(model_dir, "metrics.jsonl"), "a")  # noqa: SIM115

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
