"""Tests for tfbn.finetune.checkpoint: partial restore by path and strict resume."""

import gc
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfbn
from tfbn.finetune import checkpoint as checkpoint_lib


def model(num_classes, extra_head_layer=False):
    inputs = keras.Input((6,))
    with keras.name_scope("backbone"):
        x = keras.layers.Dense(4, use_bias=False, name="dense1")(inputs)
        x = tfbn.BatchNormalization(name="bn1")(x)
        x = keras.layers.Dense(4, use_bias=False, name="dense2")(x)
        x = tfbn.BatchNormalization(name="bn2")(x)
    with keras.name_scope("head"):
        if extra_head_layer:
            x = keras.layers.Dense(4, name="extra")(x)
        x = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, x)


@pytest.fixture
def saved(tmp_path):
    """A trained-looking 80-class model with known BN statistics, saved with Adam slots."""
    keras.utils.set_random_seed(0)
    full = model(80)
    for index, name in enumerate(["bn1", "bn2"]):
        layer = full.get_layer(name)
        layer.moving_mean.assign(np.full(4, 1.0 + index, np.float32))
        layer.moving_variance.assign(np.full(4, 2.0 + index, np.float32))
        layer.gamma.assign(np.full(4, 1.5, np.float32))
        layer.beta.assign(np.full(4, 0.3, np.float32))
    optimizer = keras.optimizers.Adam()
    optimizer.build(full.trainable_variables)
    ckpt = checkpoint_lib.make_checkpoint(
        full, optimizer, tf.Variable(7, dtype=tf.int64), tf.Variable(0, dtype=tf.int64)
    )
    prefix = ckpt.save(str(tmp_path / "ckpt"))
    return prefix, {v.path: v.numpy() for v in full.variables}


def test_read_model_variables_by_path(saved):
    prefix, values = saved
    read = checkpoint_lib.read_model_variables(prefix)
    assert sorted(read) == sorted(values)
    assert all(np.array_equal(read[p], values[p]) for p in values)
    # A directory resolves to its latest checkpoint.
    assert sorted(checkpoint_lib.read_model_variables(prefix.rsplit("/", 1)[0])) == sorted(values)


def test_partial_restore_before_first_call_restores_backbone_only(saved, caplog):
    prefix, values = saved
    keras.utils.set_random_seed(1)
    new = model(3)  # Never called: a different head, fresh initialization.
    head_before = {v.path: v.numpy() for v in new.variables if v.path.startswith("head/")}
    with caplog.at_level(logging.WARNING):
        report = checkpoint_lib.restore_partial(new, prefix, include=["backbone/"])
        new(np.ones((2, 6), np.float32), training=False)
        gc.collect()  # Deferred restorations would warn when their objects die.
    for v in new.variables:
        if v.path.startswith("backbone/"):
            assert np.array_equal(v.numpy(), values[v.path]), v.path
        else:
            assert np.array_equal(v.numpy(), head_before[v.path]), v.path
    assert report.restored == [p for p in values if p.startswith("backbone/")]
    assert report.skipped == ["head/logits/bias", "head/logits/kernel"]
    assert report.not_restored == ["head/logits/kernel", "head/logits/bias"]
    assert "Unresolved object" not in caplog.text


def test_typo_and_missing_and_shape_errors(saved):
    prefix, _ = saved
    with pytest.raises(ValueError, match="'backbon/' matches no variable.*backbone/"):
        checkpoint_lib.restore_partial(model(3), prefix, include=["backbon/"])
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['head/extra/kernel'"):
        checkpoint_lib.restore_partial(model(80, extra_head_layer=True), prefix)
    with pytest.raises(ValueError, match="shape"):
        checkpoint_lib.restore_partial(model(3), prefix)
    report = checkpoint_lib.restore_partial(
        model(80, extra_head_layer=True), prefix, exclude=["head/extra/"]
    )
    assert "head/extra/kernel" in report.not_restored


class Net(keras.Model):
    """A subclassed model: it has no variables until it is called."""

    def __init__(self):
        super().__init__(name="net")
        self.dense = keras.layers.Dense(4, use_bias=False, name="dense1")
        self.bn = tfbn.BatchNormalization(name="bn1")

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


def test_unbuilt_subclassed_model_is_built_from_sample_input(tmp_path):
    sample = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    source = Net()
    source(sample)
    source.bn.moving_mean.assign(np.arange(4, dtype=np.float32))
    zero = tf.Variable(0, dtype=tf.int64)
    optimizer = keras.optimizers.SGD()
    optimizer.build(source.trainable_variables)
    prefix = checkpoint_lib.make_checkpoint(source, optimizer, zero, zero).save(str(tmp_path / "c"))
    target = Net()
    with pytest.raises(ValueError, match="sample_input"):
        checkpoint_lib.restore_partial(target, prefix)
    report = checkpoint_lib.restore_partial(target, prefix, sample_input=sample)
    assert len(report.restored) == 5 and not report.not_restored  # kernel, gamma, beta, 2 stats
    np.testing.assert_array_equal(target(sample, training=False), source(sample, training=False))


def test_not_a_trainer_checkpoint(tmp_path):
    prefix = tf.train.Checkpoint(v=tf.Variable(1.0)).save(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="not written by the tfbn trainer"):
        checkpoint_lib.read_model_variables(prefix)
    with pytest.raises(ValueError, match="neither a directory nor a checkpoint"):
        checkpoint_lib.resolve_checkpoint_path(str(tmp_path / "missing"))


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
