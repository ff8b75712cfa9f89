"""Input data for the trainer: the embedded `tfbn_shapes` TFDS dataset, any
installed TFDS dataset, or an image folder; see `tfbn.data.pipeline`."""

from tfbn.data import synthetic_shapes  # noqa: F401  (registers `tfbn_shapes` with TFDS)
from tfbn.data.pipeline import (
    DEFAULT_DATA_DIR,
    Split,
    eval_batches,
    load_split,
    resolve_eval_split,
    train_batches,
)

__all__ = [
    "DEFAULT_DATA_DIR",
    "Split",
    "eval_batches",
    "load_split",
    "resolve_eval_split",
    "train_batches",
]
