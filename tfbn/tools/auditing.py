"""A reviewer's checklist for BN layers, run on a model (and optionally data).

`audit(model, dataset=None)` returns an `AuditReport` of findings, each a
layer path, a check name, a severity and a message saying what is wrong and
what to do. Checks:

| check                      | severity | what it flags                                   |
|----------------------------|----------|-------------------------------------------------|
| `bias_before_bn`           | warning  | a Conv/Dense bias that the next BN cancels       |
| `never_updated`            | warning  | moving statistics still at their initial values |
| `non_finite_statistics`    | error    | NaN/inf in moving statistics, gamma or beta     |
| `negative_variance`        | error    | a moving variance below 0                       |
| `unusual_epsilon`          | warning  | epsilon outside [1e-6, 1e-2]                    |
| `unusual_momentum`         | warning  | momentum < 0.5 (PyTorch's convention?)          |
|                            | info     | momentum > 0.999 (slow warm-up)                 |
| `training_hardcoded`       | error    | trainable BN called with `training=True`        |
| `training_hardcoded_false` | warning  | trainable BN called with `training=False`       |
| `frozen_bn_training_flag`  | info     | frozen BN called with `training=True` (ignored) |
| `statistics_mismatch`      | warning  | (with data) moving statistics far from the data |
| `not_built`                | info     | a BN layer without weights yet                  |
| `graph_checks_skipped`     | info     | a subclassed model: no graph to inspect         |
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from tfbn.layers import introspection
from tfbn.tools import model_graph, population_statistics

SEVERITIES = ("error", "warning", "info")
_EPSILON_RANGE = (1e-6, 1e-2)
_MOMENTUM_LOW = 0.5
_MOMENTUM_HIGH = 0.999


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem found by `audit`.

    Attributes:
        layer: Path of the layer concerned (e.g. `"backbone/bn1"`).
        check: Name of the check (see the module docstring).
        severity: `"error"`, `"warning"` or `"info"`.
        message: What is wrong and how to fix it.
    """

    layer: str
    check: str
    severity: str
    message: str


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """The findings of `audit`, most severe first."""

    findings: list[Finding]

    def count(self, severity: str) -> int:
        """How many findings have `severity`.

        Args:
            severity: `"error"`, `"warning"` or `"info"`.

        Returns:
            The number of findings of that severity.

        Raises:
            ValueError: For an unknown severity.
        """
        if severity not in SEVERITIES:
            raise ValueError(f"`severity` must be one of {SEVERITIES}; received {severity!r}.")
        return sum(finding.severity == severity for finding in self.findings)

    def to_text(self) -> str:
        """The report as text.

        Returns:
            A plain-text table (severity, layer, check, message) and a summary
            line of the counts.
        """
        header = ("SEVERITY", "LAYER", "CHECK", "MESSAGE")
        rows = [header] + [(f.severity, f.layer, f.check, f.message) for f in self.findings]
        widths = [max(len(row[column]) for row in rows) for column in range(3)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3]
            for row in rows
        ]
        summary = ", ".join(f"{self.count(s)} {s}" for s in SEVERITIES)
        if not self.findings:
            lines.append("(no findings)")
        return "\n".join(lines + [f"BN audit: {summary}"])

    def to_json(self) -> str:
        """The report as JSON.

        Returns:
            `{"findings": [...], "counts": {...}}` as an indented JSON string.
        """
        return json.dumps(
            {
                "findings": [dataclasses.asdict(f) for f in self.findings],
                "counts": {s: self.count(s) for s in SEVERITIES},
            },
            indent=2,
        )


def audit(
    model,
    dataset=None,
    num_batches: int | None = None,
    mean_tolerance: float = 0.1,
    variance_tolerance: float = 0.25,
) -> AuditReport:
    """Checks a model's BN layers (tfbn and stock Keras) for common mistakes.

    Args:
        model: A Keras model. Graph checks (bias before BN, hard-coded
            training flags) need a Functional or Sequential model.
        dataset: Optional batches (as for `tfbn.recompute_statistics`). With
            data, each BN layer's moving statistics are compared with the
            population statistics of its input in inference mode.
        num_batches: Use only the first `num_batches` batches of `dataset`.
        mean_tolerance: Largest accepted `|moving_mean - mean| / std` (per
            channel, std of the data) before `statistics_mismatch`.
        variance_tolerance: Largest accepted relative deviation of
            `moving_variance + eps` from the data's `variance + eps`.

    Returns:
        An `AuditReport`; nothing in the model is changed.

    Raises:
        ValueError: As `tfbn.tools.population_statistics.population_moments`
            for a bad `dataset` or `num_batches`.
        TypeError: For an unbatched array as `dataset`.
    """
    findings: list[Finding] = []
    layers = introspection.batch_norm_layers(model)
    for layer in layers:
        findings.extend(_layer_findings(layer))
    findings.extend(_graph_findings(model))
    if dataset is not None and layers:
        moments = population_statistics.population_moments(model, dataset, num_batches)
        for layer in layers:
            if layer.path in moments and layer.built:
                finding = _mismatch(layer, moments[layer.path], mean_tolerance, variance_tolerance)
                if finding is not None:
                    findings.append(finding)
    findings.sort(key=lambda f: SEVERITIES.index(f.severity))
    return AuditReport(findings)


def _layer_findings(layer) -> list[Finding]:
    path = layer.path
    if not layer.built:
        return [Finding(path, "not_built", "info", "Not built yet; statistics not checked.")]
    findings = []
    mean = layer.moving_mean.numpy()
    variance = layer.moving_variance.numpy()
    arrays = {"moving_mean": mean, "moving_variance": variance}
    if layer.scale:
        arrays["gamma"] = layer.gamma.numpy()
    if layer.center:
        arrays["beta"] = layer.beta.numpy()
    broken = [name for name, values in arrays.items() if not np.all(np.isfinite(values))]
    if broken:
        findings.append(
            Finding(
                path,
                "non_finite_statistics",
                "error",
                f"NaN or inf in {', '.join(broken)}: inference outputs are garbage. "
                "Restore a good checkpoint, then tfbn.recompute_statistics.",
            )
        )
    if np.any(variance < 0):
        findings.append(
            Finding(
                path,
                "negative_variance",
                "error",
                f"moving_variance has {int(np.sum(variance < 0))} negative values "
                f"(min {float(np.min(variance)):.3g}); sqrt(variance + epsilon) may be NaN. "
                "Run tfbn.recompute_statistics.",
            )
        )
    initial_mean, initial_variance = introspection.initial_moving_statistics(layer)
    tracked = getattr(layer, "num_batches_tracked", None)
    if (
        np.array_equal(mean, initial_mean)
        and np.array_equal(variance, initial_variance)
        and (tracked is None or int(tracked.numpy()) == 0)
    ):
        findings.append(
            Finding(
                path,
                "never_updated",
                "warning",
                "Moving statistics are still at their initial values: if the model was "
                "trained, the updates never ran (training=False or a loop that never "
                "passes training=True). Run tfbn.recompute_statistics on training data.",
            )
        )
    low, high = _EPSILON_RANGE
    if not low <= layer.epsilon <= high:
        findings.append(
            Finding(
                path,
                "unusual_epsilon",
                "warning",
                f"epsilon={layer.epsilon:g} is outside [{low:g}, {high:g}]; the usual values "
                "are 1e-3 (Keras) and 1e-5 (TF1, PyTorch). Tiny values blow up "
                "channels with near-zero variance; large ones flatten small variances.",
            )
        )
    findings.extend(_momentum_findings(layer))
    return findings


def _momentum_findings(layer) -> list[Finding]:
    momentum = layer.momentum
    if momentum is None:
        return []
    if momentum < _MOMENTUM_LOW:
        return [
            Finding(
                layer.path,
                "unusual_momentum",
                "warning",
                f"momentum={momentum:g} keeps only ~{1 / (1 - momentum):.1f} batches of "
                "history. PyTorch's momentum=0.1 is Keras' 0.9 (Keras momentum = 1 - "
                "PyTorch momentum).",
            )
        ]
    if momentum > _MOMENTUM_HIGH:
        return [
            Finding(
                layer.path,
                "unusual_momentum",
                "info",
                f"momentum={momentum:g} needs ~{1 / (1 - momentum):.0f} steps to warm up; "
                "short runs leave the statistics near their initial values. Use 0.99, or "
                "tfbn.recompute_statistics after training.",
            )
        ]
    return []


def _graph_findings(model) -> list[Finding]:
    try:
        sites = model_graph.batch_norm_sites(model, recursive=True)
    except (TypeError, ValueError) as error:
        return [Finding(model.name, "graph_checks_skipped", "info", str(error))]
    findings = []
    for site in sites:
        bn, producer = site.batch_norm, site.producer
        if site.fold_blocker is None and producer.use_bias:
            findings.append(
                Finding(
                    producer.path,
                    "bias_before_bn",
                    "warning",
                    f"The bias of {producer.name!r} ({int(np.prod(producer.bias.shape))} "
                    f"parameters) is subtracted again by the mean of BN {bn.name!r}: it "
                    "learns nothing. Use use_bias=False; BN's beta is the offset.",
                )
            )
        findings.extend(_training_flag_findings(site))
    return findings


def _training_flag_findings(site) -> list[Finding]:
    bn, training = site.batch_norm, site.training_argument
    if training is True and bn.trainable:
        return [
            Finding(
                bn.path,
                "training_hardcoded",
                "error",
                "Called with training=True: it normalizes with batch statistics even in "
                "predict(), so a sample's prediction depends on the rest of its batch. "
                "Leave training to the call context.",
            )
        ]
    if training is True:
        return [
            Finding(
                bn.path,
                "frozen_bn_training_flag",
                "info",
                "Called with training=True but trainable=False: a frozen BN always runs "
                "in inference mode (Keras rule), so the flag is ignored. Remove it.",
            )
        ]
    if training is False and bn.trainable:
        return [
            Finding(
                bn.path,
                "training_hardcoded_false",
                "warning",
                "Called with training=False while trainable: fit() trains gamma and beta "
                "but never updates the moving statistics. To freeze the layer, set "
                "trainable=False instead.",
            )
        ]
    return []


def _mismatch(layer, moments, mean_tolerance, variance_tolerance) -> Finding | None:
    epsilon = layer.epsilon
    expected_variance = moments.stored_variance(introspection.variance_estimator(layer))
    mean = layer.moving_mean.numpy().astype(np.float64)
    variance = layer.moving_variance.numpy().astype(np.float64)
    mean_error = np.abs(mean - moments.mean) / np.sqrt(expected_variance + epsilon)
    variance_error = np.abs((variance + epsilon) / (expected_variance + epsilon) - 1.0)
    worst_mean, worst_variance = float(np.max(mean_error)), float(np.max(variance_error))
    if not (worst_mean > mean_tolerance or worst_variance > variance_tolerance):
        return None
    return Finding(
        layer.path,
        "statistics_mismatch",
        "warning",
        f"Moving statistics disagree with the data's ({moments.num_calls} batches): "
        f"mean off by up to {worst_mean:.3g} std (tolerance {mean_tolerance}), variance "
        f"off by up to {100 * worst_variance:.1f}% (tolerance {100 * variance_tolerance:.0f}%). "
        "Run tfbn.recompute_statistics if the data is representative.",
    )
