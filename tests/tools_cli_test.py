"""Tests for tfbn.tools_cli, run in-process on saved `.keras` models."""

import json
import os

import keras
import numpy as np
import pytest

import tfbn
from tfbn.tools import cli as tools_cli
from tfbn.tools.population_statistics import population_moments

L = keras.layers


@pytest.fixture()
def saved_model(tmp_path):
    inputs = keras.Input((5,))
    x = L.Dense(4, name="dense")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, tfbn.BatchNormalization(name="bn_top")(L.ReLU()(x)))
    rng = np.random.default_rng(0)
    data = rng.normal(2.0, 3.0, (10, 5)).astype("float32")
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    np.save(os.path.join(tmp_path, "data.npy"), data)
    return path, data, tmp_path


def test_recompute_then_fold_then_convert(saved_model, capsys):
    path, data, tmp = saved_model
    recomputed, folded, converted = (os.path.join(tmp, f"{n}.keras") for n in "rfc")

    assert (
        tools_cli.main(
            [
                "recompute-statistics",
                path,
                recomputed,
                "--data",
                os.path.join(tmp, "data.npy"),
                "--batch-size",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    model = keras.models.load_model(recomputed)
    batches = [data[:4], data[4:8], data[8:]]
    stats = population_moments(model, batches)
    bn_mean = model.get_layer("bn").moving_mean.numpy()
    np.testing.assert_allclose(bn_mean, stats["bn"].mean, rtol=1e-5, atol=1e-6)

    assert tools_cli.main(["fold", recomputed, folded]) == 0
    assert "folded bn into dense" in capsys.readouterr().out
    np.testing.assert_allclose(
        keras.models.load_model(folded)(data), model(data, training=False), rtol=1e-5, atol=1e-5
    )

    assert tools_cli.main(["convert", recomputed, converted, "--to", "tfbn"]) == 0
    assert isinstance(keras.models.load_model(converted).get_layer("bn"), tfbn.BatchNormalization)


def test_audit_writes_json_and_fails_on_errors(saved_model):
    path, data, tmp = saved_model
    np.savez(os.path.join(tmp, "data.npz"), inputs=data, labels=np.zeros(10))
    report_path = os.path.join(tmp, "report.json")
    argv = [
        "audit",
        path,
        "--data",
        os.path.join(tmp, "data.npz"),
        "--data-key",
        "inputs",
        "--format",
        "json",
        "--output",
        report_path,
    ]
    assert tools_cli.main(argv) == 0
    with open(report_path) as handle:
        checks = {(f["layer"], f["check"]) for f in json.load(handle)["findings"]}
    assert ("dense", "bias_before_bn") in checks
    assert ("bn", "statistics_mismatch") in checks

    model = keras.models.load_model(path)
    model.get_layer("bn").moving_variance.assign([-1.0, 1.0, 1.0, 1.0])
    model.save(path)
    assert tools_cli.main(["audit", path, "--fail-on-error", "--output", report_path]) == 1


def test_ambiguous_npz_needs_a_key(saved_model):
    _, data, tmp = saved_model
    archive = os.path.join(tmp, "two.npz")
    np.savez(archive, a=data, b=data)
    with pytest.raises(ValueError, match="--data-key"):
        tools_cli.load_batches(archive, 4)
