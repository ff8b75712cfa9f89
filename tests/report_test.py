"""Tests for tfbn.finetune.report: rows by nested path and the frozen-statistics verdict."""

import json

import numpy as np
import pytest

from tfbn import models
from tfbn.finetune import report
from tfbn.finetune.update_plan import plan_update


def run_report(mode, update_part, move):
    """The report of a plan after the statistics of the layers in `move` were changed."""
    model = models.build_model("bn_mlp", 3, (4, 4, 3))
    plan = plan_update(model, update_part, frozen_bn_mode=mode)
    layers = [layer for layer, _ in plan.bn_modes]
    baseline = report.snapshot(layers)
    for layer in layers:
        if plan.path(layer) in move:
            layer.moving_mean.assign(layer.moving_mean.numpy() + 1.0)
    return report.bn_report(plan, baseline)


def test_rows_name_layers_by_nested_path_and_flag_moved_statistics():
    rows = run_report("inference", ["head/"], move={"head/fc_bn"})
    assert [(r["path"], r["mode"], r["stats_bit_identical"]) for r in rows] == [
        ("backbone/bn1", "inference", True),
        ("backbone/bn2", "inference", True),
        ("head/fc_bn", "train", False),
    ]
    assert rows[2]["max_abs_change"]["moving_mean"] == pytest.approx(1.0)
    assert report.frozen_stats_verdict(rows) == "yes (2 layers checked)"
    assert report.verdict_line(rows) == "Frozen BN statistics bit-identical: yes (2 layers checked)"


def test_changed_frozen_statistics_say_no_and_name_the_layer():
    rows = run_report("batch", ["head/"], move={"backbone/bn2"})
    assert report.frozen_stats_verdict(rows) == "NO, changed: ['backbone/bn2']"


@pytest.mark.parametrize(
    "mode, update_part, counts",
    [("adapt", ["head/"], "1 in the update set, 2 in adapt mode"), ("inference", [], "3 in the")],
)
def test_nothing_frozen_says_n_a_with_the_reason(tmp_path, mode, update_part, counts):
    rows = run_report(mode, update_part, move={"backbone/bn1", "head/fc_bn"})
    verdict = report.frozen_stats_verdict(rows)
    assert verdict.startswith("n/a (no BN layer has frozen statistics: ") and counts in verdict
    path = tmp_path / "bn_report.json"
    report.write_report(str(path), rows)
    payload = json.loads(path.read_text())
    assert payload["frozen_statistics_checked"] == 0
    assert payload["frozen_statistics_verdict"] == verdict
    assert payload["violations"] == []


def test_snapshot_round_trip(tmp_path):
    model = models.build_model("bn_mlp", 3, (4, 4, 3))
    values = report.snapshot(plan_update(model).layers_in(["train"]))
    report.save_snapshot(str(tmp_path / "b.npz"), values)
    loaded = report.load_snapshot(str(tmp_path / "b.npz"))
    assert loaded.keys() == values.keys()
    for layer, items in values.items():
        assert all(np.array_equal(loaded[layer][name], value) for name, value in items.items())


def test_loaded_model_with_same_layer_names_in_two_parts(tmp_path):
    import keras

    def part(name):
        inputs = keras.Input((3,))
        x = keras.layers.Dense(3, name="dense")(inputs)
        return keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(x), name=name)

    inputs = keras.Input((3,))
    keras.Model(inputs, part("head")(part("backbone")(inputs))).save(tmp_path / "m.keras")
    model = keras.saving.load_model(tmp_path / "m.keras")
    plan = plan_update(model, ["head/"])
    layers = [layer for layer, _ in plan.bn_modes]
    assert [layer.path for layer in layers] == ["bn", "bn"]  # Keras' paths collide on load.
    baseline = report.snapshot(layers)
    head_bn = model.get_layer("head").get_layer("bn")
    head_bn.moving_mean.assign(head_bn.moving_mean.numpy() + 2.0)
    rows = report.bn_report(plan, baseline)
    assert [(r["path"], r["mode"], r["stats_bit_identical"]) for r in rows] == [
        ("backbone/bn", "inference", True),
        ("head/bn", "train", False),
    ]
    assert rows[1]["max_abs_change"]["moving_mean"] == pytest.approx(2.0)
