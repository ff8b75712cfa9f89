"""Tests for tfbn.finetune.outputs: the console reporter and chief / worker outputs."""

import os

import keras
import tensorflow as tf
from trainer_test import small_model

from tfbn.finetune import outputs
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
    chief.write_flags()
    baseline = chief.baseline([layer for layer, _ in plan.bn_modes], resumed=False)
    rows = chief.write_report(plan, baseline)
    assert [row["stats_bit_identical"] for row in rows] == [True, True]
    assert {"flags.txt", outputs.BASELINE_FILE, "bn_report.json"} <= set(os.listdir(tmp_path))
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
    worker.write_flags()
    assert worker.baseline([], resumed=False) is None
    assert worker.write_report(plan, None) is None and worker.export(model) is None
    logger = worker.logger()
    logger.scalars("train", 1, {"loss": 1.0})
    logger.close()
    assert os.listdir(tmp_path) == [] and not worker.evaluates
    worker.reporter.say("hidden")
    assert capsys.readouterr().out == ""
    assert isinstance(model, keras.Model)
