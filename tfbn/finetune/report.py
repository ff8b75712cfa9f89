"""The BN report: what happened to every BN layer since the restore.

For each BN layer: its path, whether it was in the update set, its mode, and
the max absolute change of moving mean / variance, gamma and beta since the
baseline (the values right after the restore, saved in the model_dir so a
resumed run still reports against the same baseline). A fine-tune run proves
with it that frozen statistics stayed bit-identical and trained ones moved.
"""

from __future__ import annotations

import json

import numpy as np

from tfbn.finetune.update_plan import BNMode, UpdatePlan
from tfbn.layers import introspection
from tfbn.nn.batch_norm import STATISTIC_NAMES

Snapshot = dict[str, dict[str, np.ndarray]]
_SEPARATOR = "|"
# Modes in which a BN layer's moving statistics must not change (`inference`, `batch`).
FROZEN_STAT_MODES = tuple(mode for mode in BNMode if not mode.updates_statistics)


def snapshot(bn_layers) -> Snapshot:
    """Copies of every BN layer's gamma, beta and moving statistics, by Keras layer path.

    The keys only need to be the same for the same model object (and for the
    same model rebuilt by a resumed run); the report rows name layers by
    their nested path instead. Layers of a loaded model can share a Keras
    path (`bn` inside two sub-models); repeats get `#2`, `#3`, ... in layer
    order (`snapshot_keys`).

    Args:
        bn_layers: The BN layers.

    Returns:
        `{layer path: {variable name: value}}`, with the variables of
        `introspection.state_variables` (gamma, beta and every statistic).
    """
    bn_layers = list(bn_layers)
    return {
        key: {
            name: np.array(variable.numpy())
            for name, variable in introspection.state_variables(layer).items()
        }
        for key, layer in zip(snapshot_keys(bn_layers), bn_layers)
    }


def snapshot_keys(bn_layers) -> list[str]:
    """The snapshot key of each layer: its Keras path, with `#n` on the n-th repeat.

    Args:
        bn_layers: The BN layers, in the order they are snapshot and reported.

    Returns:
        One key per layer.
    """
    seen: dict[str, int] = {}
    keys = []
    for layer in bn_layers:
        path = layer.path or layer.name
        seen[path] = seen.get(path, 0) + 1
        keys.append(path if seen[path] == 1 else f"{path}#{seen[path]}")
    return keys


def save_snapshot(path: str, values: Snapshot) -> None:
    """Writes a snapshot as a `.npz` file.

    Args:
        path: The file to write.
        values: The snapshot.
    """
    flat = {
        f"{layer}{_SEPARATOR}{name}": value
        for layer, items in values.items()
        for name, value in items.items()
    }
    with open(path, "wb") as stream:
        np.savez(stream, **flat)


def load_snapshot(path: str) -> Snapshot:
    """Reads a snapshot written by `save_snapshot`.

    Args:
        path: The `.npz` file.

    Returns:
        The snapshot.
    """
    values: Snapshot = {}
    with np.load(path) as data:
        for key in data.files:
            layer, name = key.rsplit(_SEPARATOR, 1)
            values.setdefault(layer, {})[name] = data[key]
    return values


def bn_report(plan: UpdatePlan, baseline: Snapshot) -> list[dict]:
    """One row per BN layer of `plan`, comparing its variables with `baseline`.

    Args:
        plan: The update plan (its BN layers and modes).
        baseline: The snapshot taken right after the restore.

    Returns:
        Rows with keys `path`, `type`, `in_update_set`, `mode`,
        `max_abs_change` (per variable name), and `stats_bit_identical`.
    """
    rows = []
    keys = snapshot_keys([layer for layer, _ in plan.bn_modes])
    for key, (layer, mode) in zip(keys, plan.bn_modes):
        before = baseline.get(key, {})
        changes = {}
        identical = True
        for name, variable in introspection.state_variables(layer).items():
            now = variable.numpy()
            if name not in before:
                changes[name] = None
                continue
            changes[name] = float(np.max(np.abs(now - before[name]))) if now.size else 0.0
            if name in STATISTIC_NAMES:
                identical = identical and np.array_equal(now, before[name])
        rows.append(
            {
                "path": plan.path(layer),
                "type": type(layer).__module__.split(".")[0] + "." + type(layer).__name__,
                "in_update_set": mode is BNMode.TRAIN,
                "mode": str(mode),
                "max_abs_change": changes,
                "stats_bit_identical": bool(identical),
            }
        )
    return rows


def frozen_stats_violations(rows: list[dict]) -> list[str]:
    """Paths of layers in a frozen-statistics mode whose statistics changed.

    Args:
        rows: The report rows.

    Returns:
        The offending layer paths (empty when the frozen statistics held).
    """
    return [
        row["path"]
        for row in rows
        if row["mode"] in FROZEN_STAT_MODES and not row["stats_bit_identical"]
    ]


def frozen_stats_verdict(rows: list[dict]) -> str:
    """The one-line verdict on frozen statistics: `yes`, `NO, changed: [...]` or `n/a (why)`.

    Only layers in a frozen-statistics mode (`inference`, `batch`) promise
    bit-identical statistics. When there is none (everything trains, or every
    frozen layer is in `adapt` mode, which updates its statistics on purpose)
    there is nothing to verify, and "yes" would claim a check that did not
    happen.

    Args:
        rows: The report rows.

    Returns:
        The verdict, without the leading "Frozen BN statistics bit-identical: ".
    """
    checked = [row for row in rows if row["mode"] in FROZEN_STAT_MODES]
    if not checked:
        trained = sum(row["mode"] == BNMode.TRAIN.value for row in rows)
        adapted = sum(row["mode"] == BNMode.ADAPT.value for row in rows)
        return (
            f"n/a (no BN layer has frozen statistics: {trained} in the update set, "
            f"{adapted} in adapt mode, whose statistics update on purpose)"
        )
    violations = frozen_stats_violations(rows)
    if violations:
        return f"NO, changed: {violations}"
    return f"yes ({len(checked)} layer{'' if len(checked) == 1 else 's'} checked)"


def verdict_line(rows: list[dict]) -> str:
    """`Frozen BN statistics bit-identical: <verdict>`, the report's last console line.

    Args:
        rows: The report rows.

    Returns:
        The line.
    """
    return "Frozen BN statistics bit-identical: " + frozen_stats_verdict(rows)


def format_table(rows: list[dict]) -> str:
    """The report as an aligned text table.

    Args:
        rows: The report rows.

    Returns:
        The table, one line per layer after a header.
    """
    names = ("moving_mean", "moving_variance", "gamma", "beta")
    header = ["layer", "update", "mode", "d_mean", "d_var", "d_gamma", "d_beta", "stats"]
    lines = [header]
    for row in rows:
        change = row["max_abs_change"]
        cells = ["-" if change.get(name) is None else f"{change[name]:.3g}" for name in names]
        stats = "identical" if row["stats_bit_identical"] else "moved"
        lines.append(
            [row["path"], "yes" if row["in_update_set"] else "no", row["mode"], *cells, stats]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines
    )


def write_report(path: str, rows: list[dict]) -> None:
    """Writes `bn_report.json` with the rows and the frozen-statistics verdict.

    Args:
        path: The file to write.
        rows: The report rows.
    """
    violations = frozen_stats_violations(rows)
    payload = {
        "layers": rows,
        # True also when no layer has frozen statistics (nothing to violate);
        # the verdict says "n/a" then, and `frozen_statistics_checked` is 0.
        "frozen_statistics_bit_identical": not violations,
        "frozen_statistics_checked": sum(row["mode"] in FROZEN_STAT_MODES for row in rows),
        "frozen_statistics_verdict": frozen_stats_verdict(rows),
        "violations": violations,
    }
    with open(path, "w") as stream:
        json.dump(payload, stream, indent=2)
