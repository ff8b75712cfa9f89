"""The functional batch-normalization core, written once.

Pure TensorFlow functions with no Keras layers and no flags: batch
statistics (`moments`), the fused-kernel path (`fused`), the closed-form
gradient path (`closed_form`), Batch Renormalization (`renorm`), the
moving-average rules (`moving_averages`), the training-flag rule
(`training_flag`), and on top of them `batch_norm`: `training`, `inference`
and `update_statistics`, which `tfbn.BatchNormalization` and
`tfbn.compat.v1` both call so that every BN rule has one home.
"""
