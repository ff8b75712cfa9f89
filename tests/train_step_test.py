"""Tests for tfbn.finetune.train_step: the train step contract and the BN-mode context."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from trainer_test import MOMENTUM, batch, loss_of, small_model, values

import tfbn
from tfbn.finetune import train_step, update_plan
from tfbn.layers import introspection


def build_step(model, mode, update_part=("head/",)):
    """The library's train step for `model` with `update_part` and frozen `mode`."""
    plan = update_plan.plan_update(model, update_part, frozen_bn_mode=mode)
    step = train_step.build_train_step(model, keras.optimizers.SGD(0.1), plan)
    return plan, step, step.global_step, step.skipped_steps


@pytest.mark.parametrize("bn_type", [tfbn.BatchNormalization, keras.layers.BatchNormalization])
@pytest.mark.parametrize("mode", ["inference", "batch", "adapt"])
def test_frozen_bn_modes(bn_type, mode):
    model = small_model(bn_type)
    x, y = batch()
    bn = model.get_layer("bn1")

    def set_stats():
        bn.moving_mean.assign(np.full(4, 0.5, np.float32))
        bn.moving_variance.assign(np.full(4, 2.0, np.float32))

    set_stats()
    # The loss the step must see: moving statistics (inference) or batch ones.
    expected_loss = loss_of(model, x, y, training=(mode != "inference"))
    set_stats()  # A stock Keras BN updated itself in that forward pass.
    before_stats = values([bn.moving_mean, bn.moving_variance])
    kernel = model.get_layer("dense1").kernel.numpy()
    plan, step, _, _ = build_step(model, mode)
    frozen_before = values(plan.frozen_variables)
    out = step(x, y)
    assert bool(out["applied"])
    np.testing.assert_allclose(float(out["loss"]), expected_loss, rtol=1e-6)
    after = values([bn.moving_mean, bn.moving_variance])
    if mode == "adapt":
        h = x @ kernel
        np.testing.assert_allclose(after[0], MOMENTUM * 0.5 + (1 - MOMENTUM) * h.mean(0), rtol=1e-5)
        np.testing.assert_allclose(after[1], MOMENTUM * 2.0 + (1 - MOMENTUM) * h.var(0), rtol=1e-5)
    else:
        assert all(np.array_equal(a, b) for a, b in zip(after, before_stats))
    assert all(np.array_equal(a, b) for a, b in zip(values(plan.frozen_variables), frozen_before))
    # The backbone kernel and BN affine parameters never receive gradients.
    assert np.array_equal(model.get_layer("dense1").kernel.numpy(), kernel)


def test_update_set_bn_follows_ema_for_each_batch():
    model = small_model(head_bn=True)
    plan, step, _, _ = build_step(model, "inference")
    head_bn = model.get_layer("bn2")
    rng = np.random.default_rng(3)
    expected_mean = head_bn.moving_mean.numpy().astype(np.float64)
    expected_var = head_bn.moving_variance.numpy().astype(np.float64)
    for _ in range(3):
        x = rng.normal(1.0, 2.0, (8, 6)).astype(np.float32)
        y = rng.integers(0, 3, 8).astype(np.int32)
        # The head BN's input, computed before the step changes dense2.
        backbone = keras.Model(model.input, model.get_layer("dense2").output)
        h = backbone(x, training=False).numpy().astype(np.float64)
        step(x, y)
        expected_mean = MOMENTUM * expected_mean + (1 - MOMENTUM) * h.mean(0)
        expected_var = MOMENTUM * expected_var + (1 - MOMENTUM) * h.var(0)
        np.testing.assert_allclose(head_bn.moving_mean.numpy(), expected_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            head_bn.moving_variance.numpy(), expected_var, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("bn_type", [tfbn.BatchNormalization, keras.layers.BatchNormalization])
def test_non_finite_step_applies_nothing(bn_type):
    model = small_model(bn_type, head_bn=True)
    plan, step, step_var, skipped = build_step(model, "adapt")
    x, y = batch()
    before = values(model.variables)
    bad = x.copy()
    bad[0, 0] = np.nan
    out = step(bad, y)
    assert not bool(out["applied"])
    assert all(
        np.array_equal(a, b, equal_nan=True) for a, b in zip(values(model.variables), before)
    )
    assert int(skipped.numpy()) == 1 and int(step_var.numpy()) == 1
    out = step(x, y)
    assert bool(out["applied"]) and int(skipped.numpy()) == 1
    assert not np.array_equal(model.get_layer("bn2").moving_mean.numpy(), before[-6])


def test_a_bn_layer_called_twice_per_step_is_reported_and_updated_twice(caplog):
    # A BN layer shared by two towers must not double its decay silently.
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,))
    with keras.name_scope("head"):
        dense = keras.layers.Dense(4, name="dense")
        shared = tfbn.BatchNormalization(momentum=MOMENTUM, name="shared_bn")
        left, right = shared(dense(inputs)), shared(dense(-inputs))
        logits = keras.layers.Dense(2, name="logits")(keras.layers.Concatenate()([left, right]))
    model = keras.Model(inputs, logits)
    _, step, _, _ = build_step(model, "inference", update_part=("head/",))
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    hidden = model.get_layer("dense")(x).numpy().astype(np.float64)
    with caplog.at_level("WARNING"):
        step(tf.constant(x), tf.constant(np.arange(8) % 2, tf.int32))
    assert any(
        "head/shared_bn" in record.getMessage() and "more than once" in record.getMessage()
        for record in caplog.records
    )
    # Two updates in call order: the left tower's batch, then the right's.
    expected = np.zeros(4)
    for tower in (hidden, -hidden):
        expected = MOMENTUM * expected + (1 - MOMENTUM) * tower.mean(0)
    np.testing.assert_allclose(
        model.get_layer("shared_bn").moving_mean.numpy(), expected, rtol=1e-5, atol=1e-6
    )
    assert train_step.warn_about_repeated_calls(["a", "b"]) == []


def test_bn_modes_sets_trainable_per_mode_and_restores_after_an_exception():
    model = small_model(head_bn=True)
    plan = update_plan.plan_update(model, ["head/"], frozen_bn_mode="inference")
    backbone_bn, head_bn = model.get_layer("bn1"), model.get_layer("bn2")
    head_bn.trainable = True
    with pytest.raises(RuntimeError, match="boom"), train_step.bn_modes(plan):
        assert (backbone_bn.trainable, head_bn.trainable) == (False, True)
        raise RuntimeError("boom")
    assert (backbone_bn.trainable, head_bn.trainable) == (True, True)
    # Batch and adapt modes keep batch statistics: trainable stays True.
    for mode in ("batch", "adapt"):
        with train_step.bn_modes(update_plan.plan_update(model, ["head/"], frozen_bn_mode=mode)):
            assert backbone_bn.trainable and head_bn.trainable


def test_step_leaves_trainable_flags_as_they_were():
    model = small_model(head_bn=True)
    _, step, _, _ = build_step(model, "inference")
    step(*batch())
    assert all(layer.trainable for layer in model.layers)


@pytest.mark.parametrize("mode", ["inference", "batch", "adapt"])
def test_updates_are_applied_only_for_layers_in_updating_modes(mode):
    # momentum=None: a cumulative average, so num_batches_tracked is a
    # statistic too and must stay bit-identical in frozen-statistics modes.
    keras.utils.set_random_seed(2)
    inputs = keras.Input((6,))
    with keras.name_scope("backbone"):
        x = keras.layers.Dense(4, use_bias=False, name="dense1")(inputs)
        x = tfbn.BatchNormalization(momentum=None, name="bn1")(x)
    with keras.name_scope("head"):
        x = keras.layers.Dense(4, use_bias=False, name="dense2")(x)
        x = tfbn.BatchNormalization(momentum=None, name="bn2")(x)
        logits = keras.layers.Dense(3, name="logits")(x)
    model = keras.Model(inputs, logits)
    plan, step, _, _ = build_step(model, mode)
    frozen_bn, head_bn = model.get_layer("bn1"), model.get_layer("bn2")
    frozen_stats = introspection.statistic_variables(frozen_bn)
    head_stats = introspection.statistic_variables(head_bn)
    assert "num_batches_tracked" in frozen_stats
    frozen_before = {name: np.array(v.numpy()) for name, v in frozen_stats.items()}
    head_before = {name: np.array(v.numpy()) for name, v in head_stats.items()}
    assert bool(step(*batch())["applied"])
    frozen_after = {name: v.numpy() for name, v in frozen_stats.items()}
    head_after = {name: v.numpy() for name, v in head_stats.items()}
    moved = {
        name
        for name in frozen_before
        if not np.array_equal(frozen_before[name], frozen_after[name])
    }
    assert moved == (set(frozen_before) if mode == "adapt" else set())
    assert all(not np.array_equal(head_before[name], head_after[name]) for name in head_before)
    assert plan.updating_layers() == ([frozen_bn, head_bn] if mode == "adapt" else [head_bn])


def test_build_train_step_creates_counters_and_builds_the_optimizer():
    model = small_model()
    plan = update_plan.plan_update(model, ["head/"])
    optimizer = keras.optimizers.SGD(0.1)
    step = train_step.build_train_step(model, optimizer, plan)
    assert optimizer.built and step.plan is plan
    outputs = step(*batch())
    assert set(outputs) == {"loss", "accuracy", "applied"}
    assert (int(step.global_step.numpy()), int(step.skipped_steps.numpy())) == (1, 0)
    assert 0.0 <= float(outputs["accuracy"]) <= 1.0


def test_eval_step_and_evaluate():
    model = small_model()
    x, y = batch()
    metrics = train_step.evaluate(
        train_step.build_eval_step(model), [(x[:4], y[:4]), (x[4:], y[4:])]
    )
    logits = model(x, training=False)
    expected = float(
        tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
    )
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    assert metrics["accuracy"] == float(np.mean(np.argmax(logits, -1) == y))
    assert train_step.evaluate(train_step.build_eval_step(model), []) == {
        "loss": 0.0,
        "accuracy": 0.0,
    }
