"""Tests for `tfbn.compat.v1.slim_arg_scope`: real tf_slim code with tfbn's batch_norm."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tfbn.compat import v1 as tfbn_v1

slim = pytest.importorskip("tf_slim")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPDATE_OPS = tf.compat.v1.GraphKeys.UPDATE_OPS


def _images(seed=0):
    return np.random.default_rng(seed).normal(1.5, 2.0, (4, 6, 6, 3)).astype(np.float32)


def _one_step(build):
    """Builds `build(x)` in a fresh graph, runs one update step on a batch.

    Returns:
        (update op names, pre-BN conv output, moving_mean, moving_variance).
    """
    with tf.Graph().as_default() as graph:
        # Seeded: slim's random kernel initializer must also run under op determinism.
        tf.compat.v1.set_random_seed(0)
        x = tf.compat.v1.placeholder(tf.float32, [4, 6, 6, 3])
        build(x)
        update_ops = tf.compat.v1.get_collection(UPDATE_OPS)
        conv = graph.get_tensor_by_name("conv1/Conv2D:0")
        moving = [
            tf.compat.v1.global_variables(f"conv1/BatchNorm/{name}")[0]
            for name in ("moving_mean", "moving_variance")
        ]
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            conv_value, _ = session.run([conv, update_ops], {x: _images()})
            mean, variance = session.run(moving)
    return [op.name for op in update_ops], conv_value.astype(np.float64), mean, variance


def _ema(conv, decay):
    """One EMA step from (0, 1) with the fused path's Bessel-corrected variance."""
    n = conv.shape[0] * conv.shape[1] * conv.shape[2]
    batch_mean = conv.mean(axis=(0, 1, 2))
    batch_variance = conv.var(axis=(0, 1, 2)) * n / (n - 1)
    return (1 - decay) * batch_mean, decay + (1 - decay) * batch_variance


def test_slim_conv2d_with_tfbn_normalizer_in_arg_scope_updates_statistics():
    def build(x):
        with (
            slim.arg_scope([slim.conv2d, tfbn_v1.batch_norm], trainable=True),
            slim.arg_scope([slim.conv2d], normalizer_fn=tfbn_v1.batch_norm),
            slim.arg_scope([tfbn_v1.batch_norm], decay=0.5, scale=True, is_training=True),
        ):
            slim.conv2d(x, 4, 3, scope="conv1")
        names = [v.op.name for v in tf.compat.v1.global_variables()]
        assert names == [
            "conv1/weights",
            "conv1/BatchNorm/gamma",  # scale=True came from the arg_scope
            "conv1/BatchNorm/beta",
            "conv1/BatchNorm/moving_mean",
            "conv1/BatchNorm/moving_variance",
        ]

    update_names, conv, mean, variance = _one_step(build)
    assert update_names == ["conv1/BatchNorm/AssignMovingAvg", "conv1/BatchNorm/AssignMovingAvg_1"]
    expected_mean, expected_variance = _ema(conv, decay=0.5)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variance, expected_variance, rtol=1e-5)


def test_an_arg_scope_naming_slim_batch_norm_also_sets_tfbn_defaults():
    # Slim code migrates by replacing the normalizer only; the scope list stays.
    def build(x):
        with (
            slim.arg_scope([slim.conv2d, slim.batch_norm], outputs_collections="outputs"),
            slim.arg_scope([slim.conv2d], normalizer_fn=tfbn_v1.batch_norm),
            slim.arg_scope([slim.batch_norm], decay=0.25),
        ):
            slim.conv2d(x, 4, 3, scope="conv1")
        # The shared scope reached both ops: the BN output and the conv output.
        outputs = [t.op.name for t in tf.compat.v1.get_collection("outputs")]
        assert len(outputs) == 2 and outputs[0].startswith("conv1/BatchNorm/")
        assert outputs[1] == "conv1/Relu"

    _, conv, mean, variance = _one_step(build)
    expected_mean, expected_variance = _ema(conv, decay=0.25)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variance, expected_variance, rtol=1e-5)


def test_explicit_arguments_override_the_arg_scope():
    def build(x):
        with slim.arg_scope([tfbn_v1.batch_norm], decay=0.5):
            slim.conv2d(
                x,
                4,
                3,
                scope="conv1",
                normalizer_fn=tfbn_v1.batch_norm,
                normalizer_params={"decay": 0.75},
            )

    _, conv, mean, _ = _one_step(build)
    np.testing.assert_allclose(mean, _ema(conv, decay=0.75)[0], rtol=1e-5, atol=1e-6)


def test_tfbn_never_imports_tf_slim():
    code = (
        "import sys, tensorflow as tf, tfbn\n"
        "with tf.Graph().as_default():\n"
        "    tfbn.compat.v1.batch_norm(tf.zeros([2, 3]), decay=0.9)\n"
        "print('tf_slim' in sys.modules, tfbn.compat.v1.batch_norm._key_op)\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout.split() == ["False", "tfbn.compat.v1.contrib_api.batch_norm"]
