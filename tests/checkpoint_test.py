"""Tests for tfbn.finetune.checkpoint: the trainer's checkpoint, read by path, and strict resume."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from checkpoint_models import model, save_trained

from tfbn.finetune import checkpoint as checkpoint_lib


@pytest.fixture
def saved(tmp_path):
    """A trained-looking 80-class model with known BN statistics, saved with Adam slots."""
    return save_trained(tmp_path)


def test_read_model_variables_by_path(saved):
    prefix, values = saved
    read = checkpoint_lib.read_model_variables(prefix)
    assert sorted(read) == sorted(values)
    assert all(np.array_equal(read[p], values[p]) for p in values)
    # A directory resolves to its latest checkpoint.
    assert sorted(checkpoint_lib.read_model_variables(prefix.rsplit("/", 1)[0])) == sorted(values)


def test_not_a_trainer_checkpoint(tmp_path):
    prefix = tf.train.Checkpoint(v=tf.Variable(1.0)).save(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="not written by the tfbn trainer"):
        checkpoint_lib.read_model_variables(prefix)


def test_resume_requires_a_matching_checkpoint(tmp_path, saved):
    _, values = saved
    keras.utils.set_random_seed(0)
    first = model(80)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(first.trainable_variables)
    step = tf.Variable(5, dtype=tf.int64)
    ckpt = checkpoint_lib.make_checkpoint(first, optimizer, step, tf.Variable(1, dtype=tf.int64))
    manager = tf.train.CheckpointManager(ckpt, str(tmp_path / "run"), max_to_keep=2)
    assert checkpoint_lib.resume(ckpt, manager) is None
    manager.save(checkpoint_number=5)
    second = model(80)
    step2 = tf.Variable(0, dtype=tf.int64)
    ckpt2 = checkpoint_lib.make_checkpoint(second, optimizer, step2, tf.Variable(0, dtype=tf.int64))
    manager2 = tf.train.CheckpointManager(ckpt2, str(tmp_path / "run"), max_to_keep=2)
    assert checkpoint_lib.resume(ckpt2, manager2).endswith("-5") and int(step2.numpy()) == 5
    assert all(
        np.array_equal(a.numpy(), b.numpy()) for a, b in zip(first.variables, second.variables)
    )
    other = model(3)
    ckpt3 = checkpoint_lib.make_checkpoint(
        other, optimizer, tf.Variable(0, dtype=tf.int64), tf.Variable(0, dtype=tf.int64)
    )
    with pytest.raises(ValueError, match="does not match this run"):
        checkpoint_lib.resume(
            ckpt3, tf.train.CheckpointManager(ckpt3, str(tmp_path / "run"), max_to_keep=2)
        )


def test_tf1_saver_checkpoint_gets_a_clear_error(tmp_path):
    with tf.Graph().as_default():
        # Not random: other tests enable op determinism in this process.
        tf.compat.v1.get_variable(
            "conv1/weights", shape=(2, 3), initializer=tf.compat.v1.ones_initializer()
        )
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            prefix = saver.save(session, str(tmp_path / "model.ckpt"))
    with pytest.raises(ValueError, match="TF1 `tf.compat.v1.train.Saver`") as error:
        checkpoint_lib.read_model_variables(prefix)
    assert prefix in str(error.value) and "conv1/weights" in str(error.value)
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" not in str(error.value)
