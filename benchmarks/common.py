"""Shared timing helpers and the measurement row of the benchmarks.

Every benchmark times its contenders in one process, interleaved (one call
of each in turn, repeated), after warm-up calls that trace and compile, and
reports the median. Interleaving spreads the noise of a shared machine over
all contenders instead of penalizing whichever ran during a busy moment.

The contract of a benchmark module: `run(repeats: int = 7, smoke: bool =
False, ...) -> list[Row]`, rows built with `rows_with_ratios` (one call per
case, ratios to the case's baseline contender), raising `Skipped` when its
subject is unavailable. Targets are not part of a row: they live in
`benchmarks.targets.TARGETS` and select rows by benchmark, case and
contender.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from collections.abc import Callable

import numpy as np


class Skipped(Exception):
    """A benchmark whose subject is not available; the message says why."""


@dataclasses.dataclass
class Row:
    """One benchmark line: a case, a contender, its median time and a ratio.

    Attributes:
        benchmark: Which script (e.g. "layer").
        case: The configuration (shape, mode, pass).
        contender: What was timed (e.g. "tfbn", "keras", "raw fused op").
        median_ms: Median wall time of one call, in milliseconds.
        ratio: `median_ms` divided by the case's baseline contender.
        note: Free text (e.g. GB/s); targets are judged by `benchmarks.targets`.
    """

    benchmark: str
    case: str
    contender: str
    median_ms: float
    ratio: float | None = None
    note: str = ""


def _block(result) -> None:
    """Waits for `result` (a tensor, a nested structure of them, or None).

    Args:
        result: What a contender returned.
    """
    if result is None:
        return
    if isinstance(result, (list, tuple)):
        for item in result:
            _block(item)
        return
    if isinstance(result, dict):
        for item in result.values():
            _block(item)
        return
    if hasattr(result, "numpy"):
        result.numpy()


def time_interleaved(
    contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median milliseconds per call of each contender, timed in turn.

    Args:
        contenders: Name -> zero-argument callable; its result is fetched
            (`.numpy()`) so asynchronous work is included.
        repeats: Timed calls per contender.
        warmup: Untimed calls per contender first (tracing, compilation).

    Returns:
        Name -> median milliseconds.
    """
    for function in contenders.values():
        for _ in range(warmup):
            _block(function())
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, function in contenders.items():
            start = time.perf_counter()
            _block(function())
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: float(np.median(values)) for name, values in samples.items()}


def rows_with_ratios(
    benchmark: str,
    case: str,
    medians: dict[str, float],
    baseline: str,
    notes: dict[str, str] | None = None,
) -> list[Row]:
    """Rows for one case, each with its ratio to the `baseline` contender.

    Args:
        benchmark: The benchmark's name (e.g. `"trainer"`).
        case: The configuration timed.
        medians: Contender name -> median milliseconds, in table order.
        baseline: The contender every ratio is relative to.
        notes: Optional contender name -> note.

    Returns:
        One `Row` per contender.
    """
    notes = notes or {}
    return [
        Row(benchmark, case, name, value, value / medians[baseline], notes.get(name, ""))
        for name, value in medians.items()
    ]


def onednn_enabled() -> bool:
    """Whether TensorFlow runs with oneDNN (MKL) kernels.

    Returns:
        True when TensorFlow was built with oneDNN and it is not disabled.
    """
    from tensorflow.python.util import _pywrap_util_port  # Only public source of this fact.

    return (
        bool(_pywrap_util_port.IsMklEnabled())
        and os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0"
    )


def machine_description() -> dict[str, str]:
    """Facts that explain the numbers: CPU, cores, versions, oneDNN.

    Returns:
        Fact name -> value, in report order.
    """
    import keras
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "oneDNN": "on" if onednn_enabled() else "off",
        "GPUs": str(len(tf.config.list_physical_devices("GPU"))),
    }


def run_from_command_line(description: str, run: Callable, argv=None, extra_arguments=()) -> None:
    """The shared command line of one benchmark script: parse, run, print.

    Args:
        description: The script's one-line description.
        run: `run(repeats, smoke, *extra)` returning rows; may raise `Skipped`.
        argv: Arguments (None: `sys.argv`).
        extra_arguments: `(flag, type, default)` of further integer options
            passed to `run` after `smoke`, in order.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="one tiny case, for tests")
    for flag, kind, default in extra_arguments:
        parser.add_argument(flag, type=kind, default=default)
    args = parser.parse_args(argv)
    extra = [getattr(args, flag.lstrip("-").replace("-", "_")) for flag, _, _ in extra_arguments]
    # Imported here: the report and the targets build on `Row` from this module.
    from benchmarks import report, targets

    try:
        rows = run(args.repeats, args.smoke, *extra)
    except Skipped as skipped:
        print(f"SKIPPED: {skipped}")
        return
    print(report.rows_table(rows, targets.evaluate(rows)))
