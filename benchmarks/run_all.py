"""Runs every benchmark and writes BENCHMARKS.md.

Run: `python -m benchmarks.run_all --output BENCHMARKS.md` (a few minutes on
2 cores). `--smoke` runs one tiny case of each, for tests.

Each benchmark module has `run(repeats, smoke=False) -> list[common.Row]`
(raising `common.Skipped` when its subject is unavailable); the targets are
`benchmarks.targets.TARGETS` and the report is `benchmarks.report.render`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from benchmarks import (
    common,
    inference,
    layer,
    models,
    population_statistics,
    report,
    trainer,
    training_step,
)

BENCHMARKS: list[tuple[str, Callable[..., list[common.Row]]]] = [
    ("(1, 2) Layer time and bandwidth", layer.run),
    ("(3) Conv-BN-ReLU training step", training_step.run),
    ("(4) Inference: folded vs unfolded", inference.run),
    ("(5) Trainer vs model.fit", trainer.run),
    ("(6) BN's share of whole-model training steps", models.run),
    ("(7) Population statistics: recompute vs inference passes", population_statistics.run),
]


def run_sections(repeats: int, smoke: bool) -> list[report.Section]:
    """Runs every benchmark in `BENCHMARKS`.

    Args:
        repeats: Timed calls per contender.
        smoke: One tiny case of each benchmark.

    Returns:
        One `report.Section` per benchmark, skipped ones included.
    """
    sections = []
    for title, run in BENCHMARKS:
        print(f"running {title} ...", flush=True)
        try:
            sections.append(report.Section(title, tuple(run(repeats, smoke=smoke))))
        except common.Skipped as skipped:
            sections.append(report.Section(title, skipped=str(skipped)))
    return sections


def main(argv=None) -> str:
    """Runs the benchmarks and writes the report.

    Args:
        argv: Command-line arguments (None: `sys.argv`).

    Returns:
        The report text.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="BENCHMARKS.md")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="one tiny case of each benchmark")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    sections = run_sections(args.repeats, args.smoke)
    text = report.render(
        sections, common.machine_description(), time.perf_counter() - start, args.smoke
    )
    with open(args.output, "w") as output:
        output.write(text)
    print(f"wrote {args.output}")
    return text


if __name__ == "__main__":
    main()
