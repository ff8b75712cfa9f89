"""Tests for tfbn.finetune.run_directory and the trainer's handling of damaged run directories.

Each test reproduces an accident on a real run directory: a lost or garbled
state file, a corrupt latest checkpoint, two trainers on one directory, a
SIGKILLed holder of the lock, a resume with changed flags.
"""

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import train_py
from trainer_test import DATA_DIR, REPO, smoke_config

from tfbn.finetune import checkpoint_files, outputs, run_directory, trainer
from tfbn.finetune.config import TrainConfig

# ------------------------------------------------------------------- flag records


def test_changed_flags_compares_trajectory_fields_only():
    saved = run_directory.config_record(TrainConfig(model_dir="a", update_part=("head/",)))
    same_trajectory = TrainConfig(
        model_dir="b", update_part=("head/",), train_steps=5000, verbose=0, eval_interval=7
    )
    assert run_directory.changed_flags(saved, same_trajectory) == {}
    changed = TrainConfig(model_dir="a", learning_rate=0.01, seed=3, update_part=("x/", "y/"))
    assert run_directory.changed_flags(saved, changed) == {
        "learning_rate": (0.05, 0.01),
        "update_part": (["head/"], ["x/", "y/"]),
        "seed": (0, 3),
    }
    # A field the saved record lacks (an older version wrote it) counts as its default.
    del saved["sync_bn"]
    assert run_directory.changed_flags(
        saved, TrainConfig(model_dir="a", sync_bn=True, update_part=("head/",))
    ) == {"sync_bn": (False, True)}


def test_every_config_field_is_compared_unless_listed_as_non_trajectory():
    names = {field.name for field in dataclasses.fields(TrainConfig)}
    assert names >= run_directory.NON_TRAJECTORY_FIELDS
    for name in ("seed", "learning_rate", "lr_schedule", "optimizer", "dataset", "model"):
        assert name not in run_directory.NON_TRAJECTORY_FIELDS
    for name in ("batch_size", "strategy", "sync_bn", "bn_momentum", "update_part"):
        assert name not in run_directory.NON_TRAJECTORY_FIELDS


def test_record_keeps_the_original_and_the_history(tmp_path):
    model_dir = str(tmp_path)
    first = TrainConfig(model_dir=model_dir)
    run_directory.record_start(model_dir, first, None, {})
    second = dataclasses.replace(first, learning_rate=0.01, allow_changed_flags=True)
    changes = run_directory.check_resume_flags(model_dir, second, "ckpt-10")
    assert changes == {"learning_rate": (0.05, 0.01)}
    run_directory.record_start(model_dir, second, 10, changes)
    record = json.loads((tmp_path / run_directory.RUN_CONFIG_FILE).read_text())
    assert record["original"]["learning_rate"] == 0.05
    assert record["current"]["learning_rate"] == 0.01
    assert record["history"][0]["step"] == 10
    assert record["history"][0]["changed"] == {"learning_rate": {"saved": 0.05, "new": 0.01}}
    flags_text = (tmp_path / run_directory.FLAGS_FILE).read_text()
    assert (
        "# Changed at step 10" in flags_text
        and "--learning_rate: saved 0.05, new 0.01" in flags_text
    )
    assert "\n--learning_rate=0.01\n" in flags_text
    # The override is not carried into the record: a later resume is checked again.
    assert "\n--noallow_changed_flags\n" in flags_text
    assert record["current"]["allow_changed_flags"] is False


def test_unreadable_record_is_named(tmp_path):
    (tmp_path / run_directory.RUN_CONFIG_FILE).write_text('{"current": {"seed"')
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "run_config.json"))):
        run_directory.check_resume_flags(str(tmp_path), TrainConfig(model_dir="x"), "ckpt-1")


def test_write_text_atomically_replaces_the_whole_file(tmp_path):
    path = tmp_path / "file.txt"
    run_directory.write_text_atomically(str(path), "old\n")
    run_directory.write_text_atomically(str(path), "new\n")
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["file.txt"]


# ------------------------------------------------------------------------- locks

_HOLD_LOCK = (
    "import sys, time\n"
    "from tfbn.finetune import run_directory\n"
    "run_directory.lock_run_directory(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


def test_second_trainer_is_refused_and_a_killed_holder_frees_the_lock(tmp_path):
    model_dir = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, model_dir], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        # Another process: a whole train.py run on the same directory.
        second = subprocess.run(
            train_py.command(
                f"--model_dir={model_dir}",
                f"--data_dir={DATA_DIR}",
            ),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
        )
        assert second.returncode != 0
        # train.py hides TensorFlow's start-up lines when TF_CPP_MIN_LOG_LEVEL is unset.
        assert not re.search(r"^[IE]\d{4} |absl::InitializeLog|cuInit", second.stderr, re.M)
        assert f"--model_dir {model_dir} is in use by another training run" in second.stderr
        assert f"pid {holder.pid} on host" in second.stderr
        assert os.listdir(model_dir) == [run_directory.LOCK_FILE]  # it wrote nothing
        # And this process too, through the library.
        with pytest.raises(run_directory.RunDirectoryInUseError, match=f"pid {holder.pid}"):
            run_directory.lock_run_directory(model_dir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL ran no cleanup, yet the kernel released the lock.
    with run_directory.lock_run_directory(model_dir) as lock:
        with open(lock.path) as stream:
            holder_record = json.load(stream)
        assert holder_record["pid"] == os.getpid()
    with run_directory.lock_run_directory(model_dir):  # released by the `with`
        pass


def test_remote_model_dir_cannot_be_locked():
    with pytest.raises(ValueError, match="remote URL"):
        run_directory.lock_run_directory("gs://bucket/run")


# ------------------------------------------------------- accidents on real runs


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 10-step smoke run with checkpoints ckpt-5 and ckpt-10 (copy it before damaging it)."""
    model_dir = str(tmp_path_factory.mktemp("finished") / "run")
    trainer.train(smoke_config(model_dir))
    return model_dir


def _copy(run, tmp_path):
    target = str(tmp_path / "run")
    shutil.copytree(run, target)
    return target


def _bytes(path):
    with open(path, "rb") as stream:
        return stream.read()


def _records(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as stream:
        return [json.loads(line) for line in stream]


def test_lost_state_file_resumes_from_the_files(finished_run, tmp_path, caplog):
    model_dir = _copy(finished_run, tmp_path)
    os.remove(os.path.join(model_dir, "checkpoint"))
    kept = {
        name: _bytes(os.path.join(model_dir, name))
        for name in os.listdir(model_dir)
        if name.startswith("ckpt-")
    }
    with caplog.at_level(logging.WARNING):
        result = trainer.train(smoke_config(model_dir, "--train_steps=12", "--max_to_keep=5"))
    assert result.resumed_from == os.path.join(model_dir, "ckpt-10") and result.global_step == 12
    assert "checkpoint is missing" in caplog.text and "ckpt-10" in caplog.text
    # The old checkpoints are untouched and the manager now counts them.
    assert all(_bytes(os.path.join(model_dir, name)) == data for name, data in kept.items())
    state = tf.train.get_checkpoint_state(model_dir)
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == [
        "ckpt-5",
        "ckpt-10",
        "ckpt-12",
    ]


def test_corrupt_latest_checkpoint_falls_back_and_is_kept(finished_run, tmp_path, caplog):
    model_dir = _copy(finished_run, tmp_path)
    data_file = os.path.join(model_dir, "ckpt-10.data-00000-of-00001")
    with open(data_file, "r+b") as stream:
        stream.truncate(40)
    damaged = _bytes(data_file)
    with caplog.at_level(logging.WARNING):
        result = trainer.train(smoke_config(model_dir))
    assert result.resumed_from == os.path.join(model_dir, "ckpt-5") and result.global_step == 10
    assert data_file in caplog.text and os.path.join(model_dir, "ckpt-5") in caplog.text
    aside = os.path.join(model_dir, outputs.UNREADABLE_DIR, os.path.basename(data_file))
    assert _bytes(aside) == damaged  # moved, not overwritten by the new ckpt-10
    assert checkpoint_files.checkpoint_problem(os.path.join(model_dir, "ckpt-10")) is None
    # metrics.jsonl: one record per step and split (the lost run's 10 was dropped).
    keys = [(r["step"], r["split"]) for r in _records(model_dir)]
    assert len(keys) == len(set(keys)) and (10, "train") in keys and (10, "eval") in keys
    retrained = [r for r in _records(model_dir) if r["step"] == 10 and r["split"] == "eval"]
    assert np.isclose(retrained[0]["loss"], result.eval_metrics["loss"])


def test_no_readable_checkpoint_is_refused_and_nothing_is_written(finished_run, tmp_path):
    model_dir = _copy(finished_run, tmp_path)
    for number in (5, 10):
        os.remove(os.path.join(model_dir, f"ckpt-{number}.index"))
    before = {name: _bytes(os.path.join(model_dir, name)) for name in ("flags.txt", "checkpoint")}
    with pytest.raises(ValueError, match="holds checkpoints but none is readable") as error:
        trainer.train(smoke_config(model_dir))
    for number in (5, 10):
        assert f"ckpt-{number}.index is missing" in str(error.value)
    assert "init_checkpoint" not in str(error.value).split("pass another")[0]
    assert all(_bytes(os.path.join(model_dir, name)) == data for name, data in before.items())


def test_changed_flags_are_refused_then_recorded_when_allowed(finished_run, tmp_path):
    model_dir = _copy(finished_run, tmp_path)
    flags_before = _bytes(os.path.join(model_dir, "flags.txt"))
    record_before = _bytes(os.path.join(model_dir, "run_config.json"))
    changed = ("--train_steps=12", "--learning_rate=0.01", "--seed=3")
    with pytest.raises(ValueError, match="does not match this run") as error:
        trainer.train(smoke_config(model_dir, *changed))
    message = str(error.value)
    assert (
        "--learning_rate: saved 0.05, new 0.01" in message and "--seed: saved 0, new 3" in message
    )
    assert "train_steps: saved" not in message  # raising it is fine
    assert _bytes(os.path.join(model_dir, "flags.txt")) == flags_before  # the record survives
    assert _bytes(os.path.join(model_dir, "run_config.json")) == record_before
    result = trainer.train(smoke_config(model_dir, *changed, "--allow_changed_flags"))
    assert result.resumed_from.endswith("ckpt-10") and result.global_step == 12
    record = json.loads(_bytes(os.path.join(model_dir, "run_config.json")))
    assert (record["original"]["learning_rate"], record["current"]["learning_rate"]) == (0.05, 0.01)
    assert record["history"][0]["changed"]["seed"] == {"saved": 0, "new": 3}
    flags_text = _bytes(os.path.join(model_dir, "flags.txt")).decode()
    assert "# Changed at step 10" in flags_text and "--seed=3" in flags_text
