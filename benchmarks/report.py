"""Renders BENCHMARKS.md from benchmark rows and the targets table.

Every figure that has a target is printed next to it, met or not: in the
summary table of all targets, and in a `target` column of each benchmark's
table. Nothing here knows a target value; they come from
`benchmarks.targets.TARGETS`.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence

from benchmarks import targets as targets_lib
from benchmarks.common import Row

NOTES = """\
Reading the numbers:

* "copy" is `tf.negative(x)`, the cheapest full pass TF runs (one Eigen
  elementwise op). The fused kernels beat its bandwidth, so shares above
  100% mean "faster than TF's own elementwise pass", not a measuring error;
  the hardware bound is higher than this baseline.
* Inference is `x * a + b` on every path, bit-identical to the stock Keras
  layer (a test pins this); the raw fused inference kernel is shown for
  comparison.
* The general path's forward is `tfbn.nn.moments.batch_moments` (shifted two
  passes, float32); its backward is the closed form of `tfbn.nn.closed_form`.
  The ghost-batch view reduces over non-adjacent axes, which TF's CPU
  reduction handles by transposing the whole tensor first.
* The fused path checks each batch for data far from zero (|mean| > 10
  standard deviations) and then re-runs the kernel on shifted data; the
  XLA rows pay for that check and its conditional more than oneDNN does.
* Whole-model steps (6): "no BN" replaces every BN layer by a pass-through,
  "fused kernel only" by a bare training-mode `FusedBatchNormV3` (no moving
  statistics, no offset guard), the floor of any BN built on that kernel.
  The note gives the spread of the per-round ratios and the ratio of process
  CPU time, which other processes on a shared machine disturb less than
  wall time. Under load the wall-clock ResNet50 "no BN" step is often slower
  than the BN steps although it uses the least CPU: read both ratios.
  What was tried to cut BN's share (issue 15; 2 shared cores, load 2-8,
  per-round ratio IQRs of +-0.05 to +-0.15 in wall time):
  - Profile (tf.profiler, MobileNetV2 step): the oneDNN `FusedBatchNormV3` and
    `FusedBatchNormGradV3` kernels are about 90% of BN's op time; the rest is
    about 25 per-channel ops per layer. The bare kernel alone costs 1.50x
    (MobileNetV2) and 1.05x (ResNet50, CPU time) the no-BN step, so the
    MobileNetV2 target (1.45) lies below the kernel's own floor. Ablation on
    MobileNetV2 (CPU time, 21 rounds): bare kernel 1.59, + the two
    moving-statistic assigns 1.61, + the offset guard 1.63, full tfbn 1.67.
  - Grappler's BN+ReLU fusion (`_FusedBatchNormEx`, run by oneDNN as
    `_MklNativeFusedBatchNormEx`): on CPU it needs a float32 or bfloat16
    `FusedBatchNormV3` (float32 statistics), NHWC or NCHW, training or not,
    feeding a `Relu` (not `Relu6`; no Add side input on CPU) as the only
    consumer of its output, with no control edges. Measured on 8 BN+ReLU
    layers (32x16x16x64, fwd+bwd, CPU time): fused 0.98x the unfused (IQR
    0.90-1.04), no measurable gain; MobileNetV2's ReLU6 never matches and
    ResNet50's ReLU passes are under 1% of its step. Not adopted: it needs
    the guard's conditional off the output path.
  - Offset guard: one conditional instead of two (it returns the kernel's
    input, so the backward needs none) and the shift is taken only on the
    rare ill-conditioned branch: 96 instead of 108 graph nodes per layer
    (forward, backward, update; before Grappler, taken branches only);
    fwd+bwd over MobileNetV2's 52 BN shapes 1.04x the raw kernel (before:
    1.03x-1.07x, within noise). Kept; outputs bit-identical.
  - Moving-statistic assigns: +0.02 of the no-BN step (above); grouping them
    into one op would need one variable for both statistics, changing the
    layer's weights. Not done.
  - Casts, layout: float32 models run no Cast op and channels-last inputs
    reach oneDNN without a Transpose (profiled); nothing to remove. A no-op
    reshape of rank-4 and rank-5 outputs was dropped.
* `recompute_statistics` runs one compiled round per BN dependency level
  (49 for ResNet50, 121 for DenseNet121), each resuming from the cached
  activations of the previous one; its rows are warm (the plan is traced
  once per model), like the inference passes, and the note gives both first
  calls, tracing included.
"""


@dataclasses.dataclass(frozen=True)
class Section:
    """One benchmark's part of the report.

    Attributes:
        title: The heading, e.g. `"(3) Conv-BN-ReLU training step"`.
        rows: The benchmark's rows (empty when skipped).
        skipped: Why the benchmark did not run, or None.
    """

    title: str
    rows: tuple[Row, ...] = ()
    skipped: str | None = None


def targets_list(targets: Sequence[targets_lib.Target] = targets_lib.TARGETS) -> str:
    """The targets as a markdown list: benchmark, what is compared, the limit."""
    return "\n".join(
        f"* {target.benchmark}: {target.name} {target.comparison}" for target in targets
    )


def _figure(result: targets_lib.Result) -> str:
    value = "not measured" if result.ratio is None else f"{result.ratio:.2f}"
    return f"{value} ({result.comparison})"


def summary_table(results: Sequence[targets_lib.Result]) -> str:
    """One line per result: target, configuration, figure next to target, met."""
    lines = ["| target | configuration | measured (target) | met |", "|---|---|---|---|"]
    for result in results:
        lines.append(
            f"| {result.benchmark}: {result.name} | {result.config} | {_figure(result)} "
            f"| {result.verdict()} |"
        )
    return "\n".join(lines)


def rows_table(rows: Sequence[Row], results: Sequence[targets_lib.Result]) -> str:
    """A markdown table of `rows`, each with the targets that judge it."""
    lines = [
        "| case | contender | median ms | ratio | target | note |",
        "|---|---|---:|---:|---|---|",
    ]
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}"
        judged = [
            f"{result.name}: {_figure(result)} {result.verdict()}"
            for result in results
            if (result.benchmark, result.config, result.contender)
            == (row.benchmark, row.case, row.contender)
        ]
        lines.append(
            f"| {row.case} | {row.contender} | {row.median_ms:.2f} | {ratio} "
            f"| {'; '.join(judged)} | {row.note} |"
        )
    return "\n".join(lines)


def render(
    sections: Sequence[Section],
    machine: dict,
    seconds: float,
    smoke: bool,
    date: datetime.datetime | None = None,
) -> str:
    """The BENCHMARKS.md text.

    Args:
        sections: Every benchmark's rows (or why it was skipped), in order.
        machine: Facts about the machine (`common.machine_description()`).
        seconds: Total benchmark time.
        smoke: Whether this was a smoke run (tiny cases, no claims).
        date: When the rows were measured (default: now).

    Returns:
        The markdown report.
    """
    rows = [row for section in sections for row in section.rows]
    results = targets_lib.evaluate(rows)
    lines = [
        "# Benchmarks",
        "",
        "Regenerate with `python -m benchmarks.run_all --output BENCHMARKS.md`.",
        "Contenders are timed in one process, interleaved, after warm-up; each",
        "number is a median. On a small shared VM, single numbers move by",
        "10-30% between runs (and so do the ratios, by a few hundredths);",
        "compare ratios within a table, not absolute times across runs.",
        "",
        "## Machine",
        "",
    ]
    lines += [f"* {key}: {value}" for key, value in machine.items()]
    lines += [
        f"* date: {date or datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"* total benchmark time: {seconds:.0f} s" + (" (smoke run)" if smoke else ""),
        "* XLA is not the default of any tfbn path; the `xla` rows opt in with",
        "  `jit_compile=True`.",
        "",
        "## Targets",
        "",
        "Ratios are time / time of the reference (lower is faster) unless the",
        'target says ">=": then a throughput relative to the reference (steps',
        "per second, or the share of the copy pass's bandwidth). Targets apply",
        "to the tf.function rows; XLA rows are informative only.",
        "",
        targets_list(),
        "",
        NOTES,
        "Measured in this run:",
        "",
        summary_table(results),
        "",
    ]
    for section in sections:
        body = (
            f"SKIPPED: {section.skipped}" if section.skipped else rows_table(section.rows, results)
        )
        lines += [f"## {section.title}", "", body, ""]
    return "\n".join(lines)
