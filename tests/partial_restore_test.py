"""Tests for tfbn.finetune.partial_restore: partial restore by nested variable path."""

import gc
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from checkpoint_models import model, save_trained

import tfbn
from tfbn.finetune import checkpoint as checkpoint_lib
from tfbn.finetune import partial_restore


@pytest.fixture
def saved(tmp_path):
    """A trained-looking 80-class model with known BN statistics, saved with Adam slots."""
    return save_trained(tmp_path)


def test_partial_restore_before_first_call_restores_backbone_only(saved, caplog):
    prefix, values = saved
    keras.utils.set_random_seed(1)
    new = model(3)  # Never called: a different head, fresh initialization.
    head_before = {v.path: v.numpy() for v in new.variables if v.path.startswith("head/")}
    with caplog.at_level(logging.WARNING):
        report = partial_restore.restore_partial(new, prefix, include=["backbone/"])
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
        partial_restore.restore_partial(model(3), prefix, include=["backbon/"])
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['head/extra/kernel'"):
        partial_restore.restore_partial(model(80, extra_head_layer=True), prefix)
    with pytest.raises(ValueError, match="shape"):
        partial_restore.restore_partial(model(3), prefix)
    report = partial_restore.restore_partial(
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
        partial_restore.restore_partial(target, prefix)
    report = partial_restore.restore_partial(target, prefix, sample_input=sample)
    assert len(report.restored) == 5 and not report.not_restored  # kernel, gamma, beta, 2 stats
    np.testing.assert_array_equal(target(sample, training=False), source(sample, training=False))
