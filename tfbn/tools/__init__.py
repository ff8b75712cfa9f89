"""Inference and statistics tools for tfbn and stock Keras BN layers.

`folding` (fold BN into the preceding Conv/Dense), `population_statistics`
(recompute exact population statistics), `conversion` (stock Keras <-> tfbn,
PyTorch state dicts), `auditing` (find BN mistakes in a model), `model_graph`
(where BN layers sit in a graph) and `cli` (`tfbn-tools`).
"""
