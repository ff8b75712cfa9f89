"""tfbn: Batch Normalization done right for TensorFlow 2 / Keras 3.

Public API:
    BatchNormalization: drop-in for `keras.layers.BatchNormalization`.
    deferred_updates: collect moving-statistics updates and apply them by
        layer path (TF1's UPDATE_OPS, made explicit and scope-aware).
    fold_batch_norm, recompute_statistics, convert_batch_norm, audit:
        inference and statistics tools (also `tfbn-tools` on the command line).
    compat.v1: graph-mode `batch_normalization` / `batch_norm` with
        UPDATE_OPS, for TF1-style code on TF 2.x without tf_keras.
    partial_finetune: make `model.fit` train only an update set (scope
        patterns), with frozen BN layers in inference, batch or adapt mode
        (imported on first use: `tfbn.finetune.keras_fit`).
"""

# First, before anything loads TensorFlow (see `_startup`).
from tfbn import _startup

with _startup.quiet_tensorflow_startup():
    from tfbn import compat
    from tfbn.deferred_updates import (
        CollectorScopeError,
        PendingUpdate,
        UnappliedUpdatesError,
        UpdateCollector,
        deferred_updates,
    )
    from tfbn.layers.batch_normalization import BatchNormalization

    # Registers `PartsModel`, the class of the bundled models, so that `import tfbn`
    # is enough to load a `.keras` file exported by the trainer.
    from tfbn.models import parts as _parts  # noqa: F401
    from tfbn.tools.auditing import AuditReport, Finding, audit
    from tfbn.tools.conversion import convert_batch_norm, load_torch_batch_norm_state
    from tfbn.tools.folding import ChannelAffine, FoldDecision, fold_batch_norm
    from tfbn.tools.population_statistics import (
        PopulationMoments,
        population_moments,
        recompute_statistics,
    )

    if _startup.ENABLED:
        # Looks for GPUs now, while the noise is held back ("failed call to cuInit");
        # logical devices stay configurable afterwards.
        import tensorflow as _tf

        _tf.config.list_physical_devices()

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import tfbn` does not load the fine-tune package (and its
    # imports of tfbn's own modules cannot run into a half-initialised tfbn).
    if name == "partial_finetune":
        from tfbn.finetune.keras_fit import partial_finetune

        return partial_finetune
    raise AttributeError(f"module 'tfbn' has no attribute {name!r}")


__all__ = [
    "AuditReport",
    "BatchNormalization",
    "ChannelAffine",
    "CollectorScopeError",
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
    "partial_finetune",
    "population_moments",
    "recompute_statistics",
]
