"""The seed's Tiny-YOLO head fine-tune (examples/tiny_yolo_v1.py), with exact assertions."""

import importlib.util
import os

import numpy as np
import pytest
import tensorflow as tf

from tfbn.compat import v1 as tfbn_v1

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny_yolo_v1.py")
STEPS = 4


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("tiny_yolo_v1", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(example, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("backbone") / "backbone.ckpt")
    return prefix, example.write_backbone_checkpoint(prefix)


def _fine_tune(example, prefix, wiring):
    """Restores the backbone, trains STEPS steps; returns values and head expectations."""
    model = example.build_training_graph(wiring)
    images, targets = example.fine_tune_data()
    feed = {model.images: images, model.targets: targets, model.is_training: True}
    with model.graph.as_default(), tf.compat.v1.Session() as session:
        session.run(tf.compat.v1.global_variables_initializer())
        model.backbone_saver.restore(session, prefix)
        head_mean = tf.compat.v1.global_variables(example.HEAD + "/conv1/BatchNorm/moving_mean")[0]
        head_variance = tf.compat.v1.global_variables(
            example.HEAD + "/conv1/BatchNorm/moving_variance"
        )[0]
        want_mean = session.run(head_mean).astype(np.float64)
        want_variance = session.run(head_variance).astype(np.float64)
        decay = example.BATCH_NORM_DECAY
        for _ in range(STEPS):
            # The head BN's input for this step (same weights, same batch).
            bn_input = session.run(model.endpoints["head_bn_input"], feed).astype(np.float64)
            session.run(model.train_op, feed)
            want_mean = decay * want_mean + (1 - decay) * bn_input.mean(axis=(0, 1, 2))
            # 4D input, TF1's fused path: the stored variance is Bessel-corrected.
            want_variance = decay * want_variance + (1 - decay) * bn_input.var(
                axis=(0, 1, 2), ddof=1
            )
        values = {v.op.name: session.run(v) for v in tf.compat.v1.global_variables("tiny_yolo")}
        eval_feed = {**feed, model.is_training: False}
        bn_input, bn_output = session.run(
            [model.endpoints["head_bn_input"], model.endpoints["head_bn_output"]], eval_feed
        )
    return values, (want_mean, want_variance), (bn_input, bn_output)


def _backbone(values, example):
    return {name: value for name, value in values.items() if name.startswith(example.BACKBONE)}


def test_naive_wiring_rewrites_frozen_backbone_statistics(example, checkpoint):
    prefix, saved = checkpoint
    values, _, _ = _fine_tune(example, prefix, "naive")
    backbone = _backbone(values, example)
    assert set(backbone) == set(saved)
    for name, value in backbone.items():
        if "moving_" in name:
            assert not np.array_equal(value, saved[name]), name
        else:  # var_list protected the kernels, gamma and beta.
            assert np.array_equal(value, saved[name]), name


def test_scoped_wiring_keeps_backbone_and_updates_head_by_the_ema(example, checkpoint):
    prefix, saved = checkpoint
    values, (want_mean, want_variance), _ = _fine_tune(example, prefix, "scoped")
    for name, value in _backbone(values, example).items():
        assert np.array_equal(value, saved[name]), name
    head = example.HEAD + "/conv1/BatchNorm/"
    np.testing.assert_allclose(values[head + "moving_mean"], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        values[head + "moving_variance"], want_variance, rtol=1e-5, atol=1e-6
    )
    model = example.build_training_graph("scoped")
    found = tfbn_v1.check_update_dependencies(model.train_op, scope=example.HEAD)
    assert sorted(op.name for op in found) == [head + "AssignMovingAvg", head + "AssignMovingAvg_1"]


def test_checker_catches_unwired_train_op_before_first_step(example):
    model = example.build_training_graph("unwired")
    with pytest.raises(tfbn_v1.MissingUpdateDependenciesError) as error:
        tfbn_v1.check_update_dependencies(model.train_op, scope=example.HEAD)
    head = example.HEAD + "/conv1/BatchNorm/"
    assert f"'{head}AssignMovingAvg'" in str(error.value)
    assert f"'{head}AssignMovingAvg_1'" in str(error.value)


def test_eval_after_fine_tune_uses_updated_statistics(example, checkpoint):
    prefix, _ = checkpoint
    values, _, (bn_input, bn_output) = _fine_tune(example, prefix, "scoped")
    for name, value in values.items():
        if name.endswith("moving_mean"):
            assert not np.all(value == 0.0), name
        if name.endswith("moving_variance"):
            assert not np.all(value == 1.0), name
    head = example.HEAD + "/conv1/BatchNorm/"
    gamma, beta = values[head + "gamma"], values[head + "beta"]
    mean, variance = values[head + "moving_mean"], values[head + "moving_variance"]
    expected = gamma * (bn_input - mean) / np.sqrt(variance + example.BATCH_NORM_EPSILON) + beta
    np.testing.assert_allclose(bn_output, expected, rtol=1e-5, atol=1e-5)
