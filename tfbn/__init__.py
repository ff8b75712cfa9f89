"""tfbn: Batch Normalization done right for TensorFlow 2 / Keras 3.

Public API:
    BatchNormalization: drop-in for `keras.layers.BatchNormalization`.
    deferred_updates: collect moving-statistics updates and apply them by
        layer path (TF1's UPDATE_OPS, made explicit and scope-aware).
    compat.v1: graph-mode `batch_normalization` / `batch_norm` with
        UPDATE_OPS, for TF1-style code on TF 2.x without tf_keras.
"""

from tfbn import compat
from tfbn.deferred_updates import (
    PendingUpdate,
    UnappliedUpdatesError,
    UpdateCollector,
    deferred_updates,
)
from tfbn.layers.batch_normalization import BatchNormalization

__version__ = "0.1.0"

__all__ = [
    "BatchNormalization",
    "PendingUpdate",
    "compat",
    "UnappliedUpdatesError",
    "UpdateCollector",
    "deferred_updates",
]
