"""Inference and statistics tools for tfbn and stock Keras BN layers.

`tfbn.tools.folding` (fold BN into the preceding Conv/Dense),
`tfbn.tools.population_statistics` (recompute exact population statistics,
on `tfbn.tools.frontier_passes`: compiled rounds that resume from cached
activations; `tfbn.tools.dataset_passes`: reading batches and eager whole
passes; `tfbn.tools.moment_pools`: exact float64 pooling),
`tfbn.tools.stored_statistics` (how population statistics become a layer's
stored values), `tfbn.tools.conversion` (stock Keras <-> tfbn, PyTorch state
dicts), `tfbn.tools.auditing` (find BN mistakes in a model),
`tfbn.tools.model_graph` (where BN layers sit in a graph) and
`tfbn.tools.cli` (`tfbn-tools`, also `python -m tfbn.tools`).

The library speaks Python: its errors name arguments (`num_batches`), and
only `tfbn.tools.cli` names flags (`--num-batches`).
"""
