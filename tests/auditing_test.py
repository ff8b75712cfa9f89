"""Tests for tfbn.tools.auditing (`tfbn.audit`).

Each planted BN mistake is found; a clean model is clean.
"""

import json
import re

import keras
import numpy as np

import tfbn
from tfbn.tools.auditing import AuditReport, Finding, audit
from tfbn.tools.population_statistics import recompute_statistics

L = keras.layers


def _trained_looking(model, seed=0):
    """Moving statistics away from their initial values, as after training."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, (tfbn.BatchNormalization, L.BatchNormalization)):
            layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))


def _clean_model():
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(4, 3, use_bias=False)(inputs)
    x = tfbn.BatchNormalization(name="bn_a")(x)
    x = L.ReLU()(x)
    x = L.Dense(3, use_bias=False)(L.Flatten()(x))
    return keras.Model(inputs, L.BatchNormalization(name="bn_b")(x))


def test_clean_model_has_no_findings():
    model = _clean_model()
    _trained_looking(model)
    report = audit(model)
    assert report.findings == []
    assert "(no findings)" in report.to_text()


def test_every_planted_mistake_is_reported_once():
    inputs = keras.Input((4,))
    biased = L.Dense(4, name="biased_dense")(inputs)
    x = tfbn.BatchNormalization(name="after_bias")(biased)
    x = tfbn.BatchNormalization(name="nan_stats")(x)
    x = L.BatchNormalization(name="negative_var")(x)
    x = tfbn.BatchNormalization(epsilon=1e-8, name="tiny_eps")(x)
    x = L.BatchNormalization(momentum=0.1, name="torch_momentum")(x)
    x = tfbn.BatchNormalization(name="forced_training")(x, training=True)
    x = L.BatchNormalization(name="forced_inference")(x, training=False)
    frozen = tfbn.BatchNormalization(name="frozen")
    x = frozen(x, training=True)
    never = tfbn.BatchNormalization(momentum=None, name="never")
    model = keras.Model(inputs, never(x))
    _trained_looking(model)
    frozen.trainable = False
    model.get_layer("nan_stats").moving_mean.assign([0.0, np.nan, 0.0, 0.0])
    model.get_layer("negative_var").moving_variance.assign([1.0, -0.5, 1.0, 1.0])
    never.moving_mean.assign(np.zeros(4))
    never.moving_variance.assign(np.ones(4))

    report = audit(model)

    found = sorted((f.layer, f.check, f.severity) for f in report.findings)
    assert found == sorted(
        [
            ("biased_dense", "bias_before_bn", "warning"),
            ("nan_stats", "non_finite_statistics", "error"),
            ("negative_var", "negative_variance", "error"),
            ("tiny_eps", "unusual_epsilon", "warning"),
            ("torch_momentum", "unusual_momentum", "warning"),
            ("forced_training", "training_hardcoded", "error"),
            ("forced_inference", "training_hardcoded_false", "warning"),
            ("frozen", "frozen_bn_training_flag", "info"),
            ("never", "never_updated", "warning"),
        ]
    )
    assert [f.severity for f in report.findings][:3] == ["error"] * 3
    assert (report.count("error"), report.count("warning"), report.count("info")) == (3, 5, 1)


def test_data_check_flags_only_the_layer_that_disagrees():
    model = _clean_model()
    rng = np.random.default_rng(1)
    batches = [rng.normal(1.0, 2.0, (8, 6, 6, 2)).astype("float32") for _ in range(2)]
    recompute_statistics(model, batches, progress=False)
    assert audit(model, batches).findings == []

    bn_b = model.get_layer("bn_b")
    std = np.sqrt(bn_b.moving_variance.numpy())
    bn_b.moving_mean.assign(bn_b.moving_mean.numpy() + 0.5 * std)
    report = audit(model, batches)

    assert [(f.layer, f.check) for f in report.findings] == [("bn_b", "statistics_mismatch")]
    shifted_by = float(
        re.search(r"mean off by up to ([0-9.]+) std", report.findings[0].message).group(1)
    )
    np.testing.assert_allclose(shifted_by, 0.5, atol=2e-3)


def test_text_and_json_renderings():
    report = AuditReport(
        [
            Finding("backbone/bn1", "never_updated", "warning", "still 0/1"),
            Finding("head/bn", "negative_variance", "error", "min -1"),
        ]
    )
    lines = report.to_text().splitlines()
    assert lines[0].split() == ["SEVERITY", "LAYER", "CHECK", "MESSAGE"]
    assert lines[1].split()[:3] == ["warning", "backbone/bn1", "never_updated"]
    assert lines[-1] == "BN audit: 1 error, 1 warning, 0 info"
    decoded = json.loads(report.to_json())
    assert decoded["counts"] == {"error": 1, "warning": 1, "info": 0}
    assert decoded["findings"][1] == {
        "layer": "head/bn",
        "check": "negative_variance",
        "severity": "error",
        "message": "min -1",
    }


def test_subclassed_model_skips_graph_checks_but_checks_layers():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.bn = tfbn.BatchNormalization(epsilon=0.5)

        def call(self, x):
            return self.bn(x)

    net = Net()
    net(np.zeros((2, 3), "float32"))
    checks = sorted(f.check for f in audit(net).findings)
    assert checks == ["graph_checks_skipped", "never_updated", "unusual_epsilon"]
