"""Tests for tfbn.finetune.trainer: the train step contract and end-to-end runs."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import tfbn
from tfbn.finetune import checkpoint as checkpoint_lib
from tfbn.finetune import flags as tfbn_flags
from tfbn.finetune import trainer, update_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(tempfile.gettempdir(), "tfbn_test_data")
MOMENTUM = 0.9


def smoke_config(model_dir, *extra):
    """The smoke flagfile plus `extra` flags, parsed into a TrainConfig."""
    fv = flags.FlagValues()
    tfbn_flags.define_flags(fv)
    fv(
        [
            "train.py",
            f"--flagfile={REPO}/configs/smoke.flags",
            f"--model_dir={model_dir}",
            f"--data_dir={DATA_DIR}",
            *extra,
        ]
    )
    return tfbn_flags.config_from_flags(fv)


def small_model(bn_type=tfbn.BatchNormalization, head_bn=False):
    """Dense-BN backbone and a Dense head (optionally with BN)."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6,))
    with keras.name_scope("backbone"):
        x = keras.layers.Dense(4, use_bias=False, name="dense1")(inputs)
        x = bn_type(momentum=MOMENTUM, name="bn1")(x)
        x = keras.layers.ReLU()(x)
    with keras.name_scope("head"):
        if head_bn:
            x = keras.layers.Dense(4, use_bias=False, name="dense2")(x)
            x = bn_type(momentum=MOMENTUM, name="bn2")(x)
        logits = keras.layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, logits)


def build_step(model, mode, update_part=("head/",)):
    plan = update_plan.plan_update(model, update_part, frozen_bn_mode=mode)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(list(plan.update_variables))
    step_var = tf.Variable(0, dtype=tf.int64)
    skipped = tf.Variable(0, dtype=tf.int64)
    trainer.configure_bn_modes(plan)
    return (
        plan,
        trainer.make_train_step(model, optimizer, plan, step_var, skipped),
        step_var,
        skipped,
    )


def batch():
    rng = np.random.default_rng(0)
    return (
        rng.normal(2.0, 3.0, (8, 6)).astype(np.float32),
        np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32),
    )


def values(variables):
    return [np.array(v.numpy()) for v in variables]


def loss_of(model, x, y, training):
    with tfbn.deferred_updates() as updates:
        logits = model(x, training=training)
        updates.discard()
    return float(
        tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
    )


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


def _checkpoint_values(model_dir):
    return checkpoint_lib.read_model_variables(model_dir)


def test_pretrain_then_head_finetune_keeps_backbone_bit_identical(tmp_path, capsys):
    pre_dir, fine_dir = str(tmp_path / "pre"), str(tmp_path / "fine")
    trainer.train(smoke_config(pre_dir))
    saved = _checkpoint_values(pre_dir)
    result = trainer.train(
        smoke_config(
            fine_dir,
            "--dataset=tfbn_shapes/target",
            f"--init_checkpoint={pre_dir}",
            "--restore_part=backbone/",
            "--update_part=head/",
            "--verbose=1",
        )
    )
    assert result.restore_report.restored == [p for p in saved if p.startswith("backbone/")]
    for variable in result.model.variables:
        if variable.path.startswith("backbone/"):
            assert np.array_equal(variable.numpy(), saved[variable.path]), variable.path
    head_bn = result.model.get_layer("fc_bn")
    assert not np.array_equal(head_bn.moving_mean.numpy(), saved["head/fc_bn/moving_mean"])
    report = json.load(open(os.path.join(fine_dir, "bn_report.json")))
    assert report["frozen_statistics_bit_identical"]
    modes = {row["path"]: (row["mode"], row["stats_bit_identical"]) for row in report["layers"]}
    assert modes == {
        "backbone/bn1": ("inference", True),
        "backbone/bn2": ("inference", True),
        "head/fc_bn": ("train", False),
    }
    out = capsys.readouterr().out
    assert "Frozen BN statistics bit-identical: yes" in out and "eval step 10" in out
    assert "--update_part=head/" in open(os.path.join(fine_dir, "flags.txt")).read()
    records = [json.loads(line) for line in open(os.path.join(fine_dir, "metrics.jsonl"))]
    assert {r["split"] for r in records} == {"train", "eval"}
    assert any(name.startswith("events") for name in os.listdir(os.path.join(fine_dir, "train")))


def test_typo_in_update_part_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"haed/.*backbone/"):
        trainer.train(smoke_config(str(tmp_path), "--update_part=haed/"))


def test_resume_with_another_update_set_is_an_error(tmp_path):
    trainer.train(smoke_config(str(tmp_path), "--train_steps=2"))
    with pytest.raises(ValueError, match="does not match this run"):
        trainer.train(smoke_config(str(tmp_path), "--train_steps=4", "--update_part=head/"))


def test_dry_run_prints_sets_and_writes_nothing(tmp_path, capsys):
    model_dir = tmp_path / "run"
    trainer.train(smoke_config(str(model_dir), "--update_part=head/", "--dry_run"))
    out = capsys.readouterr().out
    assert "Update set (5 trainable variables)" in out
    assert "backbone/bn1: frozen, mode=inference" in out and "head/fc_bn: in update set" in out
    assert not model_dir.exists()


def test_export_writes_keras_and_saved_model(tmp_path):
    result = trainer.train(smoke_config(str(tmp_path / "run"), "--train_steps=2", "--export"))
    export_dir = tmp_path / "run" / "export"
    reloaded = keras.models.load_model(str(export_dir / "model.keras"))
    x = np.random.default_rng(0).random((4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(
        reloaded(x, training=False), result.model(x, training=False), atol=1e-6
    )
    served = tf.saved_model.load(str(export_dir / "saved_model"))
    np.testing.assert_allclose(served.serve(x), result.model(x, training=False), atol=1e-5)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    killed_dir = str(tmp_path / "killed")
    command = [
        sys.executable,
        os.path.join(REPO, "train.py"),
        f"--flagfile={REPO}/configs/smoke.flags",
        f"--model_dir={killed_dir}",
        f"--data_dir={DATA_DIR}",
        "--train_steps=100000",
        "--checkpoint_interval=3",
    ]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        while tf.train.latest_checkpoint(killed_dir) is None and time.time() < deadline:
            assert process.poll() is None, "training subprocess died"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    latest = tf.train.latest_checkpoint(killed_dir)
    assert latest is not None
    total = int(latest.rsplit("-", 1)[1]) + 7
    resumed = trainer.train(
        smoke_config(killed_dir, f"--train_steps={total}", "--checkpoint_interval=3")
    )
    assert resumed.resumed_from is not None and resumed.global_step == total
    straight = trainer.train(
        smoke_config(
            str(tmp_path / "straight"), f"--train_steps={total}", "--checkpoint_interval=3"
        )
    )
    for a, b in zip(resumed.model.variables, straight.model.variables):
        assert np.array_equal(a.numpy(), b.numpy()), a.path


def test_a_bn_layer_called_twice_per_step_is_reported_and_updated_twice(caplog):
    # PAIN_POINTS 18: a shared BN (two towers) must not double its decay silently.
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
    for batch in (hidden, -hidden):
        expected = MOMENTUM * expected + (1 - MOMENTUM) * batch.mean(0)
    np.testing.assert_allclose(
        model.get_layer("shared_bn").moving_mean.numpy(), expected, rtol=1e-5, atol=1e-6
    )
    assert trainer.warn_about_repeated_calls(["a", "b"]) == []
