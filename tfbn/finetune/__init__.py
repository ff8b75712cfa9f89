"""Partial fine-tuning: scope patterns, partial restore, the train step, reports.

Modules: `scopes` (which variables train, BN modes), `checkpoint` (resume and
partial restore by variable path), `trainer` (the train loop), `report` (the
BN report), `summaries` (TensorBoard and metrics.jsonl).
"""
