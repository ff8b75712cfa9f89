"""The benchmark targets: one table, and the results it gives for measured rows.

Every target ratio of the benchmarks lives in `TARGETS`, and nowhere else:
the report's list of targets, its summary table and the per-row target
column are all rendered from it. A `Target` selects rows (`common.Row`) by
benchmark, contender and a regular expression on the case, and says how to
turn a row into a ratio:

* time ratio: the row's median time divided by the median time of
  `reference` (another contender of the same case), or the row's own
  `ratio` (to its benchmark's baseline) when `reference` is None; lower is
  faster;
* throughput ratio (`higher_is_better=True`): `work / time ratio`, e.g. the
  steps per second relative to the reference, or a share of the copy
  bandwidth when the row moves `work` times the bytes of the copy.

`evaluate(rows)` returns one `Result` per (target, matching row); a target
that no row matches gives one `Result` with `ratio=None` (not measured).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from benchmarks.common import Row

_4D = r"\d+x\d+x\d+x\d+"
_2D = r"\d+x\d+"
_ANY_SHAPE = r"[\dx]+"


@dataclasses.dataclass(frozen=True)
class Target:
    """One target ratio and the rows it applies to.

    Attributes:
        name: What is compared, e.g. `"fwd+bwd vs keras"`.
        benchmark: The benchmark of the rows (`Row.benchmark`).
        contender: The contender whose rows are judged.
        case: Regular expression `re.search`-ed against `Row.case`.
        limit: The target value of the ratio.
        reference: Contender of the same case to divide by; None uses the
            row's `ratio` (relative to the benchmark's baseline).
        higher_is_better: The ratio is a throughput (`work / time ratio`) that
            must reach `limit`; otherwise a time ratio that must not exceed it.
        work: Work of the row relative to the reference's, for throughputs.
    """

    name: str
    benchmark: str
    contender: str
    case: str
    limit: float
    reference: str | None = None
    higher_is_better: bool = False
    work: float = 1.0

    @property
    def comparison(self) -> str:
        """The target as text, e.g. `"<= 0.30"`."""
        return f"{'>=' if self.higher_is_better else '<='} {self.limit:.2f}"


TARGETS: tuple[Target, ...] = (
    Target("fwd vs keras (4D)", "layer", "tfbn", rf"^{_4D} fwd function$", 0.35),
    Target("fwd+bwd vs keras (4D)", "layer", "tfbn", rf"^{_4D} fwd\+bwd function$", 0.30),
    Target("fwd vs keras (2D)", "layer", "tfbn", rf"^{_2D} fwd function$", 0.5),
    Target("fwd+bwd vs keras (2D)", "layer", "tfbn", rf"^{_2D} fwd\+bwd function$", 0.5),
    Target(
        "fwd+bwd vs the raw fused op",
        "layer",
        "tfbn",
        rf"^{_ANY_SHAPE} fwd\+bwd function$",
        1.15,
        reference="raw fused op",
    ),
    # fwd+bwd moves 5 tensors (read x, dy, x again; write y, dx), the copy 2.
    Target(
        "fwd+bwd share of the copy bandwidth",
        "layer",
        "tfbn",
        rf"^{_ANY_SHAPE} fwd\+bwd function$",
        0.8,
        reference="copy",
        higher_is_better=True,
        work=2.5,
    ),
    Target("inference vs keras", "layer", "tfbn", r" inference function$", 0.65),
    Target("general path vs keras", "layer", "tfbn (general path)", r" function, ", 0.85),
    Target("train step vs stock-BN network", "training_step", "tfbn BN", "", 0.8),
    Target("train step vs no-BN network", "training_step", "tfbn BN", "", 1.05, "no BN"),
    Target("ResNet50 train step vs no BN", "models", "tfbn", r"^ResNet50 ", 1.12, "no BN"),
    Target("MobileNetV2 train step vs no BN", "models", "tfbn", r"^MobileNetV2 ", 1.45, "no BN"),
    Target(
        "recompute_statistics vs inference passes",
        "population_statistics",
        "recompute_statistics",
        "",
        4.0,
    ),
    Target(
        "trainer steps/s vs model.fit",
        "trainer",
        "tfbn trainer",
        "",
        1.0,
        reference="model.fit",
        higher_is_better=True,
    ),
    Target(
        "streamed image folder steps/s vs image_dataset_from_directory + fit",
        "trainer",
        "tfbn trainer, streamed folder",
        r"^image folder",
        1.0,
        reference="image_dataset_from_directory + fit",
        higher_is_better=True,
    ),
    # The row's ratio column holds the growth of peak memory in MB.
    Target(
        "peak memory growth in MB, 1,500 -> 6,000 images",
        "trainer",
        "tfbn trainer, streamed folder",
        r"^peak memory",
        60.0,
    ),
)


@dataclasses.dataclass(frozen=True)
class Result:
    """One measured figure next to its target.

    Attributes:
        name: The target's name.
        config: The case the figure was measured on (`Row.case`), or
            `"not measured"`.
        ratio: The measured ratio, or None when not measured.
        target: The target's limit.
        higher_is_better: Whether `ratio` must reach (True) or stay under
            (False) `target`.
        benchmark: The benchmark of the row.
        contender: The contender of the row.
    """

    name: str
    config: str
    ratio: float | None
    target: float
    higher_is_better: bool
    benchmark: str
    contender: str

    @property
    def met(self) -> bool | None:
        """Whether the target is met; None when not measured."""
        if self.ratio is None:
            return None
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target

    @property
    def comparison(self) -> str:
        """The target as text, e.g. `"<= 0.30"`."""
        return f"{'>=' if self.higher_is_better else '<='} {self.target:.2f}"

    def verdict(self) -> str:
        """`"yes"`, `"no"` or `"not measured"`."""
        return {True: "yes", False: "no", None: "not measured"}[self.met]


def measure(target: Target, row: Row, rows: Sequence[Row]) -> float | None:
    """The ratio `target` assigns to `row`, or None without the reference.

    Args:
        target: The target.
        row: A row `target` applies to.
        rows: All rows (the reference is looked up among them).

    Returns:
        The time ratio, or the throughput ratio for a higher-is-better target.
    """
    if target.reference is None:
        time_ratio = row.ratio
    else:
        reference = _find(rows, row.benchmark, row.case, target.reference)
        time_ratio = None if reference is None else row.median_ms / reference.median_ms
    if time_ratio is None:
        return None
    return target.work / time_ratio if target.higher_is_better else time_ratio


def evaluate(rows: Sequence[Row], targets: Sequence[Target] = TARGETS) -> list[Result]:
    """Every target's results on `rows`, in table order.

    Args:
        rows: Rows from the benchmarks' `run` functions.
        targets: The targets (default: `TARGETS`).

    Returns:
        One `Result` per (target, matching row); one not-measured `Result`
        per target that matches no row.
    """
    results = []
    for target in targets:
        matching = [row for row in rows if applies(target, row)]
        for row in matching:
            results.append(
                Result(
                    target.name,
                    row.case,
                    measure(target, row, rows),
                    target.limit,
                    target.higher_is_better,
                    row.benchmark,
                    row.contender,
                )
            )
        if not matching:
            results.append(
                Result(
                    target.name,
                    "not measured",
                    None,
                    target.limit,
                    target.higher_is_better,
                    target.benchmark,
                    target.contender,
                )
            )
    return results


def applies(target: Target, row: Row) -> bool:
    """Whether `target` judges `row`."""
    return (
        row.benchmark == target.benchmark
        and row.contender == target.contender
        and re.search(target.case, row.case) is not None
    )


def _find(rows: Sequence[Row], benchmark: str, case: str, contender: str) -> Row | None:
    for row in rows:
        if row.benchmark == benchmark and row.case == case and row.contender == contender:
            return row
    return None
