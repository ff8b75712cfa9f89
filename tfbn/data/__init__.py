"""Input data for the trainer: the embedded `tfbn_shapes` TFDS dataset, any
installed TFDS dataset, or an image folder, streamed from disk; see
`tfbn.data.pipeline`."""

from tfbn.data import synthetic_shapes  # noqa: F401  (registers `tfbn_shapes` with TFDS)
from tfbn.data.pipeline import (
    DEFAULT_DATA_DIR,
    Batches,
    Split,
    available_splits,
    eval_batches,
    load_split,
    resolve_eval_split,
    steps_per_epoch,
    train_batches,
)

__all__ = [
    "DEFAULT_DATA_DIR",
    "Batches",
    "Split",
    "available_splits",
    "eval_batches",
    "load_split",
    "resolve_eval_split",
    "steps_per_epoch",
    "train_batches",
]
