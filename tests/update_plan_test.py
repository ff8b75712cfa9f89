"""Tests for tfbn.finetune.update_plan: BN modes and the update plan."""

import keras
import pytest

import tfbn
from tfbn.finetune import update_plan
from tfbn.finetune.update_plan import BNMode


def model(bn_type=tfbn.BatchNormalization, frozen_head_bn=False):
    inputs = keras.Input((5,))
    with keras.name_scope("backbone"):
        x = keras.layers.Dense(4, name="dense1")(inputs)
        x = bn_type(name="bn1")(x)
    with keras.name_scope("head"):
        x = keras.layers.Dense(4, name="dense2")(x)
        x = bn_type(name="bn2", trainable=not frozen_head_bn)(x)
        x = keras.layers.Dense(2, name="logits")(x)
    return keras.Model(inputs, x)


@pytest.mark.parametrize("bn_type", [tfbn.BatchNormalization, keras.layers.BatchNormalization])
def test_plan_head_only(bn_type):
    m = model(bn_type)
    plan = update_plan.plan_update(m, ["head/"], frozen_bn_mode="batch")
    assert [v.path for v in plan.update_variables] == [
        "head/dense2/kernel",
        "head/dense2/bias",
        "head/bn2/gamma",
        "head/bn2/beta",
        "head/logits/kernel",
        "head/logits/bias",
    ]
    assert [(layer.path, mode) for layer, mode in plan.bn_modes] == [
        ("backbone/bn1", "batch"),
        ("head/bn2", "train"),
    ]
    frozen = {v.path for v in plan.frozen_variables}
    assert "backbone/bn1/moving_mean" in frozen and "head/bn2/moving_mean" not in frozen
    assert frozen == {v.path for v in m.variables if v.path.startswith("backbone/")}


def test_freeze_part_wins_and_freeze_batchnorm_takes_all_bn_out():
    m = model()
    plan = update_plan.plan_update(m, [], ["backbone/dense1/"], freeze_batchnorm=True)
    paths = [v.path for v in plan.update_variables]
    assert paths == [
        "head/dense2/kernel",
        "head/dense2/bias",
        "head/logits/kernel",
        "head/logits/bias",
    ]
    assert all(mode == "inference" for _, mode in plan.bn_modes)


def test_adapt_mode_statistics_are_not_in_the_frozen_set():
    plan = update_plan.plan_update(model(), ["head/"], frozen_bn_mode="adapt")
    frozen = {v.path for v in plan.frozen_variables}
    assert "backbone/bn1/moving_mean" not in frozen and "backbone/bn1/gamma" in frozen


def test_layer_frozen_by_the_model_stays_in_inference():
    plan = update_plan.plan_update(model(frozen_head_bn=True), [], frozen_bn_mode="adapt")
    assert {layer.path: mode for layer, mode in plan.bn_modes}["head/bn2"] == "inference"


def test_empty_update_set_is_an_error():
    with pytest.raises(ValueError, match="update set is empty"):
        update_plan.plan_update(model(), ["head/bn2/moving_"])


def test_bn_mode_values_are_the_config_strings():
    assert [mode.value for mode in BNMode] == ["train", "inference", "batch", "adapt"]
    assert BNMode("adapt") is BNMode.ADAPT and BNMode.BATCH == "batch"
    assert f"mode={BNMode.INFERENCE}" == "mode=inference" and str(BNMode.TRAIN) == "train"
    assert [m for m in BNMode if m.updates_statistics] == [BNMode.TRAIN, BNMode.ADAPT]
    assert [m for m in BNMode if not m.uses_batch_statistics] == [BNMode.INFERENCE]


def test_plan_modes_are_enum_members_and_layers_are_selected_by_mode():
    m = model()
    plan = update_plan.plan_update(m, ["head/"], frozen_bn_mode=BNMode.ADAPT)
    assert all(isinstance(mode, BNMode) for _, mode in plan.bn_modes)
    assert plan.updating_layers() == [m.get_layer("bn1"), m.get_layer("bn2")]
    assert plan.layers_in([BNMode.TRAIN]) == [m.get_layer("bn2")]
    inference = update_plan.plan_update(m, ["head/"])
    assert inference.updating_layers() == [m.get_layer("bn2")]


def test_unknown_frozen_bn_mode_is_an_error():
    with pytest.raises(ValueError, match="`frozen_bn_mode` must be one of"):
        update_plan.plan_update(model(), ["head/"], frozen_bn_mode="train")


def test_patterns_match_nested_paths_that_survive_save_and_load(tmp_path):
    from tfbn import models

    built = models.build_model("tiny_darknet", 3, (16, 16, 3))
    built.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    # Keras' own paths lose the part scopes on load; the plan does not.
    assert "bn1/gamma" in [v.path for v in loaded.variables]
    plans = [update_plan.plan_update(m, ["head/"]) for m in (built, loaded)]
    for plan in plans:
        assert all(plan.path(v).startswith("head/") for v in plan.update_variables)
    assert [plans[1].path(v) for v in plans[1].update_variables] == [
        plans[0].path(v) for v in plans[0].update_variables
    ]
    assert plans[1].layer_paths() == [
        "backbone/bn1",
        "backbone/bn2",
        "backbone/bn3",
        "head/bn_head",
    ]
    assert str(plans[1]) == str(plans[0])


def test_describe_lists_every_path_once_with_modes():
    m = model()
    plan = update_plan.plan_update(m, ["head/"], frozen_bn_mode="batch")
    text = plan.describe()
    listed = [line.strip() for line in text.splitlines() if line.startswith("  ")]
    # Every variable once, except the statistics a train step updates on purpose.
    expected = sorted(v.path for v in m.variables if not v.path.startswith("head/bn2/moving"))
    assert sorted(listed[: len(expected)]) == expected
    assert listed[len(expected) :] == [
        "backbone/bn1: frozen, mode=batch",
        "head/bn2: in update set, mode=train",
    ]
