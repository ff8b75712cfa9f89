"""Tests for tfbn.finetune.keras_fit: `tfbn.partial_finetune` for `model.fit` users.

Frozen parts are checked from outside: weights copied before `fit`, compared
with `np.array_equal` after it and after a `.keras` save and load. The modes
are checked against `train.py`'s own train step on a copy of the model.
"""

import keras
import numpy as np
import pytest

import tfbn
from tfbn.finetune import train_step, update_plan
from tfbn.layers import introspection

LEARNING_RATE = 0.1
STEPS = 3
BATCH = 8


def nested_model(bn_type, seed=0):
    """`backbone` (Dense-BN-Dense-BN) and `head` (Dense-BN-logits) as nested sub-models."""
    keras.utils.set_random_seed(seed)

    def part(name, shape, body):
        inputs = keras.Input(shape)
        return keras.Model(inputs, body(inputs), name=name)

    def backbone(x):
        x = keras.layers.Dense(6, use_bias=False, name="dense1")(x)
        x = bn_type(momentum=0.5, name="bn1")(x)
        x = keras.layers.Dense(6, use_bias=False, name="dense2")(x)
        return bn_type(momentum=0.5, name="bn2")(x)

    def head(x):
        x = keras.layers.Dense(5, use_bias=False, name="fc")(x)
        x = bn_type(momentum=0.5, name="fc_bn")(x)
        return keras.layers.Dense(3, name="logits")(x)

    backbone_part = part("backbone", (4,), backbone)
    head_part = part("head", (6,), head)
    inputs = keras.Input((4,))
    return keras.Model(inputs, head_part(backbone_part(inputs)), name="net")


def data():
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(BATCH * STEPS, 4)) * 2.0 + 1.0).astype(np.float32)
    y = rng.integers(0, 3, size=BATCH * STEPS).astype(np.int32)
    return x, y


def weights(model):
    return {
        path: v.numpy().copy() for path, v in introspection.nested_variable_paths(model).items()
    }


def fit(model):
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    x, y = data()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)


def train_py_reference(bn_type, update_part, mode):
    """The same steps through train.py's step (`build_train_step`) on an identical model."""
    model = nested_model(bn_type)
    plan = update_plan.plan_update(model, update_part, frozen_bn_mode=mode)
    step = train_step.build_train_step(model, keras.optimizers.SGD(LEARNING_RATE), plan)
    x, y = data()
    for index in range(STEPS):
        rows = slice(index * BATCH, (index + 1) * BATCH)
        assert bool(step(x[rows], y[rows])["applied"])
    return weights(model)


def statistics_paths(paths):
    return [p for p in paths if p.endswith(("moving_mean", "moving_variance"))]


@pytest.mark.parametrize("bn_type", [tfbn.BatchNormalization, keras.layers.BatchNormalization])
@pytest.mark.parametrize("mode", ["inference", "batch", "adapt"])
def test_fit_trains_only_the_update_set_like_train_py(bn_type, mode, tmp_path):
    model = nested_model(bn_type)
    before = weights(model)
    plan = tfbn.partial_finetune(model, update_part=["head/"], frozen_bn_mode=mode)
    fit(model)
    after = weights(model)
    backbone = [p for p in before if p.startswith("backbone/")]
    head = [p for p in before if p.startswith("head/")]
    # Frozen weights (kernels, gamma, beta) never move.
    for path in backbone:
        if path not in statistics_paths(backbone):
            assert np.array_equal(after[path], before[path]), path
    # Frozen statistics: bit-identical in inference and batch mode, updated in adapt.
    for path in statistics_paths(backbone):
        moved = not np.array_equal(after[path], before[path])
        assert moved == (mode == "adapt"), path
    for path in head:
        assert not np.array_equal(after[path], before[path]), path
    # Exactly what train.py's step does with the same plan, batches and optimizer.
    reference = train_py_reference(bn_type, ["head/"], mode)
    for path, value in reference.items():
        np.testing.assert_allclose(after[path], value, rtol=1e-5, atol=1e-6, err_msg=path)
    # From outside: the exported model holds the same frozen weights.
    model.save(tmp_path / "fitted.keras")
    reloaded = weights(keras.saving.load_model(tmp_path / "fitted.keras"))
    for variable in plan.frozen_variables:
        path = plan.path(variable)
        assert np.array_equal(reloaded[path], before[path]), path


def test_plan_is_printable_and_names_paths_and_modes():
    model = nested_model(tfbn.BatchNormalization)
    plan = tfbn.partial_finetune(model, update_part=["head/"], frozen_bn_mode="batch")
    text = str(plan)
    assert "  head/fc/kernel" in text and "  backbone/dense1/kernel" in text
    assert "backbone/bn1: frozen, mode=batch" in text
    assert "head/fc_bn: in update set, mode=train" in text
    assert {plan.path(v) for v in plan.update_variables} == {
        p for p in weights(model) if p.startswith("head/") and "moving" not in p
    }


def test_pattern_that_matches_nothing_is_an_error():
    model = nested_model(tfbn.BatchNormalization)
    with pytest.raises(ValueError, match="`update_part` pattern 'hed/' matches no variable"):
        tfbn.partial_finetune(model, update_part=["hed/"])
    with pytest.raises(ValueError, match="`frozen_bn_mode`"):
        tfbn.partial_finetune(model, update_part=["head/"], frozen_bn_mode="frozen")


def test_must_be_called_before_compile():
    model = nested_model(tfbn.BatchNormalization)
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="before `model.compile`"):
        tfbn.partial_finetune(model, update_part=["head/"])


def test_a_second_call_plans_from_the_original_model():
    model = nested_model(keras.layers.BatchNormalization)
    tfbn.partial_finetune(model, update_part=["head/"])
    assert not model.get_layer("backbone").get_layer("bn1").trainable
    plan = tfbn.partial_finetune(model, update_part=["backbone/"], frozen_bn_mode="adapt")
    assert model.get_layer("backbone").get_layer("bn1").trainable
    assert {plan.path(layer): str(mode) for layer, mode in plan.bn_modes} == {
        "backbone/bn1": "train",
        "backbone/bn2": "train",
        "head/fc_bn": "adapt",
    }
    assert {v.path for v in model.trainable_variables} == {v.path for v in plan.update_variables}


def test_inference_mode_layer_with_selected_gamma_is_refused():
    model = nested_model(tfbn.BatchNormalization)
    with pytest.raises(ValueError, match="'backbone/bn1' is frozen in inference mode"):
        tfbn.partial_finetune(model, update_part=["head/", "backbone/bn1/gamma"])


@pytest.mark.parametrize("bn_type", [tfbn.BatchNormalization, keras.layers.BatchNormalization])
def test_fit_under_mirrored_strategy_keeps_frozen_statistics(bn_type, two_cpu_strategy):
    with two_cpu_strategy.scope():
        model = nested_model(bn_type)
        before = weights(model)
        tfbn.partial_finetune(model, update_part=["head/"], frozen_bn_mode="batch")
        fit(model)
    after = weights(model)
    for path in before:
        assert np.array_equal(after[path], before[path]) == path.startswith("backbone/"), path
