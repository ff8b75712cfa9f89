"""Reproducible experiments that show what BN does, on the embedded dataset.

Run one with `python -m tfbn.experiments <name> --output_dir=DIR`; each writes
`<name>.csv`, `<name>.md` and PNG plots (with matplotlib installed).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from tfbn.experiments.common import ExperimentConfig, ExperimentResult, write_result

EXPERIMENTS = {
    "convergence": "tfbn.experiments.convergence",
    "learning_rate": "tfbn.experiments.learning_rate",
    "small_batch": "tfbn.experiments.small_batch",
    "finetune_shift": "tfbn.experiments.finetune_shift",
    "statistics": "tfbn.experiments.statistics",
}


def get_experiment(name: str) -> Callable[[ExperimentConfig], ExperimentResult]:
    """The `run` function of the experiment called `name`.

    Args:
        name: A key of `EXPERIMENTS`.

    Returns:
        The experiment's `run(config) -> ExperimentResult`.

    Raises:
        ValueError: For an unknown name, listing the known ones.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"Unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}.")
    return importlib.import_module(EXPERIMENTS[name]).run


def run_experiment(name: str, config: ExperimentConfig) -> list[str]:
    """Runs one experiment and writes its files.

    Args:
        name: A key of `EXPERIMENTS`.
        config: The shared experiment settings.

    Returns:
        The paths written (CSV, markdown, plots).

    Raises:
        ValueError: For an unknown name.
    """
    result = get_experiment(name)(config)
    return write_result(result, config.output_dir)


__all__ = [
    "EXPERIMENTS",
    "ExperimentConfig",
    "ExperimentResult",
    "get_experiment",
    "run_experiment",
]
