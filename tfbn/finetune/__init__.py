"""Partial fine-tuning: the update plan, partial restore, the train step, reports.

Modules: `config` and `flags` (the typed run configuration and the absl flags
that fill it), `update_plan` (which variables train, BN modes), `checkpoint`
(resume and partial restore by variable path), `trainer` (the train loop),
`report` (the BN report), `summaries` (TensorBoard and metrics.jsonl),
`distribution` (tf.distribute strategies).
"""
