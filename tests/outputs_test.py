"""Tests for tfbn.finetune.outputs: the console reporter and chief / worker outputs."""

import json
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from trainer_test import small_model

from tfbn.finetune import checkpoint_files, outputs, summaries
from tfbn.finetune.config import TrainConfig
from tfbn.finetune.update_plan import plan_update


def test_reporter_prints_by_verbosity(capsys):
    metrics = {"loss": 1.5, "accuracy": 0.25, "steps_per_sec": 10.0}
    quiet, lines = outputs.Reporter(0), outputs.Reporter(2)
    quiet.say("hidden")
    quiet.start_progress(4)
    quiet.progress(2, metrics)
    quiet.always("shown")
    lines.start_progress(4)
    lines.progress(2, metrics)
    lines.eval_line(2, metrics)
    assert capsys.readouterr().out.splitlines() == [
        "shown",
        "step 2: loss=1.5, accuracy=0.25, steps_per_sec=10",
        "eval step 2: loss=1.5000 accuracy=0.2500",
    ]


def test_chief_outputs_write_the_run_files(tmp_path, capsys):
    config = TrainConfig(model_dir=str(tmp_path), verbose=0, export=False)
    chief = outputs.ChiefOutputs(config)
    model = small_model(head_bn=True)
    plan = plan_update(model, ["head/"])
    chief.record_start(checkpoint_files.find_checkpoints(str(tmp_path)), None, {})
    baseline = chief.baseline([layer for layer, _ in plan.bn_modes], resumed=False)
    rows = chief.write_report(plan, baseline)
    assert [row["stats_bit_identical"] for row in rows] == [True, True]
    assert {"flags.txt", "run_config.json", outputs.BASELINE_FILE, "bn_report.json"} <= set(
        os.listdir(tmp_path)
    )
    assert chief.export(model) is None and chief.evaluates
    assert capsys.readouterr().out == ""


def test_worker_outputs_write_nothing_and_drop_their_checkpoints(tmp_path, capsys):
    save_dir = str(tmp_path / "workertemp_worker_1")
    worker = outputs.WorkerOutputs(save_dir)
    model = small_model()
    plan = plan_update(model)
    checkpoint = tf.train.Checkpoint(step=tf.Variable(1))
    manager = tf.train.CheckpointManager(checkpoint, str(tmp_path / "chief"), max_to_keep=1)
    worker.save_checkpoint(manager, 1)
    assert worker.lock() is None and worker.check_resume_flags("ckpt-1") == {}
    worker.record_start(checkpoint_files.find_checkpoints(str(tmp_path)), 1, {})
    assert worker.baseline([], resumed=False) is None
    assert worker.write_report(plan, None) is None and worker.export(model) is None
    logger = worker.logger()
    logger.scalars("train", 1, {"loss": 1.0})
    logger.close()
    assert os.listdir(tmp_path) == [] and not worker.evaluates
    worker.reporter.say("hidden")
    assert capsys.readouterr().out == ""
    assert isinstance(model, keras.Model)


def test_truncated_bn_baseline_is_named_not_a_bad_zip_file(tmp_path):
    config = TrainConfig(model_dir=str(tmp_path), verbose=0, export=False)
    chief = outputs.ChiefOutputs(config)
    model = small_model(head_bn=True)
    bn_layers = [layer for layer, _ in plan_update(model).bn_modes]
    chief.baseline(bn_layers, resumed=False)
    path = tmp_path / outputs.BASELINE_FILE
    assert os.listdir(tmp_path) == [outputs.BASELINE_FILE]  # no temporary file left
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="baseline " + str(path) + " in `model_dir` is unreadable"):
        chief.baseline(bn_layers, resumed=True)
    assert path.stat().st_size == 50  # kept for the user to decide


def _record(step, split, loss):
    return json.dumps({"step": step, "split": split, "loss": loss})


@pytest.mark.parametrize("train_steps", [10, 20])
def test_resume_drops_the_metrics_of_the_lost_trajectory(tmp_path, train_steps):
    # The lost run logged up to step 12 and was killed mid-line; ckpt-10 survived.
    lines = [_record(step, "train", step / 10) for step in (5, 10, 12)]
    lines.insert(2, _record(10, "eval", 0.5))
    text = "\n".join(lines) + '\n{"step": 1'
    (tmp_path / summaries.METRICS_FILE).write_text(text)
    config = TrainConfig(model_dir=str(tmp_path), verbose=0, train_steps=train_steps)
    chief = outputs.ChiefOutputs(config)
    chief.record_start(checkpoint_files.find_checkpoints(str(tmp_path)), 10, {})
    kept = [
        json.loads(line) for line in (tmp_path / summaries.METRICS_FILE).read_text().splitlines()
    ]
    # Resumed at the end (train_steps=10), the run evaluates at step 10 again.
    expected = [(5, "train"), (10, "train")] + ([(10, "eval")] if train_steps == 20 else [])
    assert [(r["step"], r["split"]) for r in kept] == expected
    assert np.array_equal([r["loss"] for r in kept[:2]], [0.5, 1.0])
    logger = chief.logger()
    logger.scalars("train", 15, {"loss": 1.5})
    logger.close()
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps[-1] == 15 and len(steps) == len(expected) + 1


def test_resume_without_a_saved_record_warns_and_checks_nothing(tmp_path, caplog):
    chief = outputs.ChiefOutputs(TrainConfig(model_dir=str(tmp_path), seed=5))
    with caplog.at_level(logging.WARNING):
        assert chief.check_resume_flags(str(tmp_path / "ckpt-10")) == {}
    assert "run_config.json" in caplog.text and "cannot be compared" in caplog.text
