"""Tests for tfbn.finetune.update_plan: strict patterns and the update plan."""

import keras
import pytest

import tfbn
from tfbn.finetune import update_plan

PATHS = [
    "backbone/conv1/kernel",
    "backbone/bn1/gamma",
    "backbone/bn1/moving_mean",
    "head/conv1/kernel",
    "head/logits/bias",
]


def test_matching_uses_re_match_prefix_semantics():
    assert update_plan.matching(PATHS, ["head/"], "update_part") == [
        "head/conv1/kernel",
        "head/logits/bias",
    ]
    # re.match anchors at the start only: "bn1" does not match "backbone/bn1/...".
    with pytest.raises(ValueError):
        update_plan.matching(PATHS, ["bn1"], "update_part")
    assert update_plan.matching(PATHS, [r".*/bn1/"], "update_part") == PATHS[1:3]


def test_typo_lists_known_prefixes():
    with pytest.raises(
        ValueError, match=r"--restore_part pattern 'backbon/'.*'backbone/'.*'head/conv1/'"
    ):
        update_plan.matching(PATHS, ["backbon/"], "restore_part")


def test_select_include_minus_exclude_and_empty_include_means_all():
    assert update_plan.select(PATHS, [], ["head/"], "a", "b") == PATHS[:3]
    assert update_plan.select(PATHS, ["backbone/"], [r"backbone/bn1/"], "a", "b") == [
        "backbone/conv1/kernel"
    ]
    with pytest.raises(ValueError, match="--b pattern 'nope'"):
        update_plan.select(PATHS, [], ["nope"], "a", "b")


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
