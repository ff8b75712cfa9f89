"""Tests for tfbn.finetune.trainer: the Trainer object and end-to-end runs."""

import json
import os
import signal
import subprocess
import tempfile
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
import train_py
from absl import flags

import tfbn
from benchmarks.trainer import write_image_folder
from tfbn.finetune import checkpoint as checkpoint_lib
from tfbn.finetune import flags as tfbn_flags
from tfbn.finetune import skip_limit, trainer
from tfbn.layers import introspection

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


def read_text(path):
    """The contents of a text file."""
    with open(path) as stream:
        return stream.read()


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
    report = json.loads(read_text(os.path.join(fine_dir, "bn_report.json")))
    assert report["frozen_statistics_bit_identical"]
    modes = {row["path"]: (row["mode"], row["stats_bit_identical"]) for row in report["layers"]}
    assert modes == {
        "backbone/bn1": ("inference", True),
        "backbone/bn2": ("inference", True),
        "head/fc_bn": ("train", False),
    }
    out = capsys.readouterr().out
    assert "Frozen BN statistics bit-identical: yes" in out and "eval step 10" in out
    assert "--update_part=head/" in read_text(os.path.join(fine_dir, "flags.txt"))
    records = [
        json.loads(line) for line in read_text(os.path.join(fine_dir, "metrics.jsonl")).splitlines()
    ]
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
    command = train_py.command(
        f"--model_dir={killed_dir}",
        f"--data_dir={DATA_DIR}",
        "--train_steps=100000",
        "--checkpoint_interval=3",
    )
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


def test_trainer_object_initialize_train_report_export(tmp_path):
    model_dir = tmp_path / "run"
    config = smoke_config(str(model_dir), "--train_steps=3", "--update_part=head/")
    run = trainer.Trainer(config)
    run.initialize()
    assert not model_dir.exists()  # initialize builds, it writes nothing
    assert int(run.step.global_step.numpy()) == 0 and run.step.plan is run.plan
    assert "head/fc_bn: in update set, mode=train" in run.describe()
    frozen_bn = run.model.get_layer("bn1")
    statistics = introspection.statistic_variables(frozen_bn)
    before = {name: np.array(v.numpy()) for name, v in statistics.items()}
    result = run.train()
    assert (result.global_step, result.skipped_steps) == (3, 0)
    assert set(result.eval_metrics) == {"loss", "accuracy"}
    assert all(np.array_equal(before[name], v.numpy()) for name, v in statistics.items())
    assert all(layer.trainable for layer, _ in run.plan.bn_modes)  # modes were undone
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("-3")
    rows = run.write_report()
    assert {row["path"]: row["mode"] for row in rows}["backbone/bn1"] == "inference"
    assert (model_dir / "bn_report.json").exists() and run.export() is None
    assert np.isclose(run.evaluate()["loss"], result.eval_metrics["loss"])


def test_trainer_train_initializes_itself_and_resumes(tmp_path):
    model_dir = str(tmp_path / "run")
    first = trainer.Trainer(smoke_config(model_dir, "--train_steps=2")).train()
    assert first.resumed_from is None and first.global_step == 2
    second = trainer.Trainer(smoke_config(model_dir, "--train_steps=4")).train()
    assert second.resumed_from.endswith("-2") and second.global_step == 4


def test_library_errors_name_the_argument_not_the_flag(tmp_path):
    with pytest.raises(ValueError, match="`update_part` pattern 'haed/'") as error:
        trainer.train(smoke_config(str(tmp_path), "--update_part=haed/"))
    assert "--update_part" not in str(error.value)


def _poison_last_kernel(run):
    """Makes every loss NaN: the last Dense kernel becomes NaN."""
    kernel = [v for v in run.model.trainable_variables if v.path.endswith("kernel")][-1]
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))


def test_a_run_whose_steps_keep_being_skipped_stops_with_an_error(tmp_path):
    model_dir = tmp_path / "run"
    config = smoke_config(str(model_dir), "--train_steps=10", "--max_consecutive_skipped_steps=3")
    run = trainer.Trainer(config)
    run.initialize()
    _poison_last_kernel(run)
    with pytest.raises(
        skip_limit.NonFiniteTrainingError, match=r"3 consecutive steps \(steps 1 to 3\)"
    ):
        run.train()
    assert int(run.step.global_step.numpy()) == 3
    assert int(run.step.skipped_steps.numpy()) == 3
    assert tf.train.latest_checkpoint(str(model_dir)) is None  # interval 5: none reached


def test_skip_limit_zero_lets_a_skipping_run_finish(tmp_path):
    config = smoke_config(
        str(tmp_path / "run"), "--train_steps=4", "--max_consecutive_skipped_steps=0"
    )
    run = trainer.Trainer(config)
    run.initialize()
    _poison_last_kernel(run)
    result = run.train()
    assert (result.global_step, result.skipped_steps) == (4, 4)


def _peak_rss_mb_of_training(model_dir, dataset):
    """Peak resident memory (MB) of a `train.py` process that trains 3 steps on `dataset`."""
    command = train_py.command(
        f"--model_dir={model_dir}",
        f"--dataset={dataset}",
        "--image_size=64",
        "--train_steps=3",
        "--checkpoint_interval=3",
    )
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, stderr.decode(errors="replace")[-3000:]
    return usage.ru_maxrss / 1024.0  # kilobytes on Linux


def test_peak_memory_does_not_grow_with_the_image_folder(tmp_path):
    # Loading the split into memory as float32 costs ~235 KB per 64x64 image
    # (1,000 more images: ~230 MB); streaming from disk costs ~nothing per image.
    small, large = str(tmp_path / "small"), str(tmp_path / "large")
    write_image_folder(small, 64)
    write_image_folder(large, 1064)
    peak_small = _peak_rss_mb_of_training(str(tmp_path / "run_small"), f"folder:{small}")
    peak_large = _peak_rss_mb_of_training(str(tmp_path / "run_large"), f"folder:{large}")
    assert peak_large - peak_small < 60, (peak_small, peak_large)
