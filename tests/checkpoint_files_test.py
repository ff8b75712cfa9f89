"""Tests for tfbn.finetune.checkpoint_files: a damaged run directory's checkpoints."""

import logging
import os
import re

import keras
import pytest
import tensorflow as tf
from checkpoint_models import model

from tfbn.finetune import checkpoint as checkpoint_lib
from tfbn.finetune import checkpoint_files


def test_path_that_is_neither_a_directory_nor_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="neither a directory nor a checkpoint"):
        checkpoint_files.resolve_checkpoint_path(str(tmp_path / "missing"))


@pytest.fixture
def run_dir(tmp_path):
    """A model_dir with checkpoints ckpt-5 and ckpt-10 saved by a CheckpointManager."""
    keras.utils.set_random_seed(0)
    net = model(3)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(net.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = checkpoint_lib.make_checkpoint(net, optimizer, step, tf.Variable(0, dtype=tf.int64))
    manager = tf.train.CheckpointManager(ckpt, str(tmp_path / "run"), max_to_keep=5)
    for number in (5, 10):
        step.assign(number)
        manager.save(checkpoint_number=number)
    return str(tmp_path / "run"), ckpt


def _data_file(prefix):
    return prefix + ".data-00000-of-00001"


def _truncate(path, size):
    with open(path, "r+b") as stream:
        stream.truncate(size)


def _flip_last_byte(path):
    with open(path, "r+b") as stream:
        stream.seek(-1, 2)
        byte = stream.read(1)
        stream.seek(-1, 2)
        stream.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("accident", ["missing", "garbled"])
def test_lost_or_garbled_state_file_hides_no_checkpoint(run_dir, accident):
    directory, _ = run_dir
    state_file = os.path.join(directory, "checkpoint")
    if accident == "missing":
        os.remove(state_file)
    else:
        with open(state_file, "w") as stream:
            stream.write('model_checkpoint_path: "ckpt-10\n{{{ garbage')
    assert tf.train.latest_checkpoint(directory) is None  # what TensorFlow alone sees
    search = checkpoint_files.find_checkpoints(directory)
    assert search.latest == os.path.join(directory, "ckpt-10")
    assert search.older == [os.path.join(directory, "ckpt-5")] and not search.unreadable
    assert state_file in search.state_problem
    assert ("missing" if accident == "missing" else "unparsable") in search.state_problem
    checkpoint_files.write_state_file(search)
    state = tf.train.get_checkpoint_state(directory)
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == ["ckpt-5", "ckpt-10"]
    assert checkpoint_files.find_checkpoints(directory).state_problem is None


def test_state_file_naming_an_older_checkpoint_is_reported(run_dir):
    directory, ckpt = run_dir
    tf.compat.v1.train.update_checkpoint_state(directory, os.path.join(directory, "ckpt-5"))
    search = checkpoint_files.find_checkpoints(directory)
    assert search.latest.endswith("ckpt-10") and "names" in search.state_problem


ACCIDENTS = {
    # accident: (damage, the file the message must name)
    "truncated data": (lambda p: _truncate(_data_file(p), 40), ".data-00000-of-00001"),
    "empty data": (lambda p: _truncate(_data_file(p), 0), ".data-00000-of-00001"),
    "deleted data": (lambda p: os.remove(_data_file(p)), ".data-00000-of-00001"),
    "flipped byte in data": (lambda p: _flip_last_byte(_data_file(p)), ".data-00000-of-00001"),
    "truncated index": (lambda p: _truncate(p + ".index", 30), ".index"),
    "empty index": (lambda p: _truncate(p + ".index", 0), ".index"),
    "deleted index": (lambda p: os.remove(p + ".index"), ".index"),
}


@pytest.mark.parametrize("accident", sorted(ACCIDENTS))
def test_unreadable_latest_checkpoint_is_named_and_skipped(run_dir, accident, caplog):
    directory, _ = run_dir
    damage, suffix = ACCIDENTS[accident]
    latest = os.path.join(directory, "ckpt-10")
    damage(latest)
    problem = checkpoint_files.checkpoint_problem(latest)
    assert problem is not None and latest + suffix in problem, problem
    search = checkpoint_files.find_checkpoints(directory)
    assert search.latest == os.path.join(directory, "ckpt-5")
    assert list(search.unreadable) == [latest] and latest + suffix in search.describe_unreadable()
    with caplog.at_level(logging.WARNING):
        assert checkpoint_files.resolve_checkpoint_path(directory) == search.latest
    assert latest in caplog.text and search.latest in caplog.text  # names both
    # Read directly, the damaged checkpoint names its file, and a run's own
    # checkpoint (argument=None) does not blame `init_checkpoint`.
    with pytest.raises(ValueError, match=re.escape(latest + suffix)) as error:
        checkpoint_lib.read_model_variables(latest, argument=None)
    assert "init_checkpoint" not in str(error.value)


def test_directory_without_a_readable_checkpoint_names_the_files(run_dir):
    directory, _ = run_dir
    for number in (5, 10):
        os.remove(os.path.join(directory, f"ckpt-{number}.index"))
    with pytest.raises(ValueError, match="no readable checkpoint") as error:
        checkpoint_files.resolve_checkpoint_path(directory)
    for number in (5, 10):
        assert os.path.join(directory, f"ckpt-{number}.index is missing") in str(error.value)
    assert "`init_checkpoint`" in str(error.value)


def test_set_aside_moves_the_files_and_overwrites_nothing(run_dir):
    directory, _ = run_dir
    prefix = os.path.join(directory, "ckpt-10")
    contents = {name: _read_bytes(path) for name, path in _named(prefix)}
    aside = os.path.join(directory, "aside")
    first = checkpoint_files.set_aside(prefix, aside)
    assert checkpoint_files.files_of(prefix) == []
    assert {os.path.basename(path): _read_bytes(path) for path in first} == contents
    # The same names again (a second accident) get a suffix; the first copies stay.
    for name, data in contents.items():
        with open(os.path.join(directory, name), "wb") as stream:
            stream.write(data[:3])
    second = checkpoint_files.set_aside(prefix, aside)
    assert sorted(os.path.basename(p) for p in second) == sorted(f"{n}.1" for n in contents)
    assert {os.path.basename(path): _read_bytes(path) for path in first} == contents


def _named(prefix):
    return [(os.path.basename(path), path) for path in checkpoint_files.files_of(prefix)]


def _read_bytes(path):
    with open(path, "rb") as stream:
        return stream.read()
