"""tfbn: Batch Normalization done right for TensorFlow 2 / Keras 3.

Public API:
    BatchNormalization: drop-in for `keras.layers.BatchNormalization`.
    deferred_updates: collect moving-statistics updates and apply them by
        layer path (TF1's UPDATE_OPS, made explicit and scope-aware).
    fold_batch_norm, recompute_statistics, convert_batch_norm, audit:
        inference and statistics tools (also `tfbn-tools` on the command line).
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
from tfbn.tools.auditing import AuditReport, Finding, audit
from tfbn.tools.conversion import convert_batch_norm, load_torch_batch_norm_state
from tfbn.tools.folding import ChannelAffine, FoldDecision, fold_batch_norm
from tfbn.tools.population_statistics import (
    PopulationMoments,
    population_moments,
    recompute_statistics,
)

__version__ = "0.1.0"

__all__ = [
    "AuditReport",
    "BatchNormalization",
    "ChannelAffine",
    "Finding",
    "FoldDecision",
    "PendingUpdate",
    "PopulationMoments",
    "UnappliedUpdatesError",
    "UpdateCollector",
    "audit",
    "compat",
    "convert_batch_norm",
    "deferred_updates",
    "fold_batch_norm",
    "load_torch_batch_norm_state",
    "population_moments",
    "recompute_statistics",
]
