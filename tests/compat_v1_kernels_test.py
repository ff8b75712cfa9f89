"""`tfbn.compat.v1` runs the layer's kernels: fused where eligible, closed-form otherwise."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from harness import forward_backward

import tfbn
from tfbn.compat import v1 as tfbn_v1

UPDATE_OPS = tf.compat.v1.GraphKeys.UPDATE_OPS
FUSED_OP = "FusedBatchNormV3"


def _data(shape, seed, loc=2.0, scale=3.0):
    return np.random.default_rng(seed).normal(loc, scale, shape).astype(np.float32)


def _run(build, batch, dy):
    """One training step: (op types, output, [dx, dgamma, dbeta], moving mean, moving variance)."""
    with tf.Graph().as_default() as graph:
        x = tf.constant(batch)
        y = build(x)
        variables = {v.op.name.rsplit("/", 1)[-1]: v for v in tf.compat.v1.global_variables()}
        gradients = tf.gradients(tf.reduce_sum(y * dy), [x, variables["gamma"], variables["beta"]])
        op_types = {op.type for op in graph.get_operations()}
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            out, grads, _ = session.run([y, gradients, tf.compat.v1.get_collection(UPDATE_OPS)])
            stats = session.run([variables["moving_mean"], variables["moving_variance"]])
    return op_types, out, grads, stats


def _layer_step(batch, dy, axis):
    layer = tfbn.BatchNormalization(
        axis=axis,
        momentum=0.5,
        epsilon=1e-3,
        moving_variance_estimator="unbiased",
        gamma_initializer=keras.initializers.Constant(1.5),
        beta_initializer=keras.initializers.Constant(0.25),
    )
    y, *grads = forward_backward(layer, batch, dy)
    return y, grads, [layer.moving_mean.numpy(), layer.moving_variance.numpy()]


@pytest.mark.parametrize(
    "shape, axis", [((4, 3, 3, 5), -1), ((4, 5, 3, 3), 1), ((8, 5), -1), ((4, 5, 6), 1)]
)
def test_fused_and_general_paths_agree_with_each_other_and_the_layer(shape, axis):
    batch, dy = _data(shape, 0), _data(shape, 1, 0.0, 1.0)
    paths = {}
    for fused in (None, False):
        paths[fused] = _run(
            lambda x, fused=fused: tfbn_v1.batch_normalization(
                x,
                axis=axis,
                momentum=0.5,
                epsilon=1e-3,
                training=True,
                fused=fused,
                gamma_initializer=tf.compat.v1.constant_initializer(1.5),
                beta_initializer=tf.compat.v1.constant_initializer(0.25),
                moving_variance_estimator="unbiased",
            ),
            batch,
            dy,
        )
    # Which kernel ran: fused=None takes FusedBatchNormV3 wherever it can run.
    assert FUSED_OP in paths[None][0]
    assert FUSED_OP not in paths[False][0]
    want_y, want_grads, want_stats = _layer_step(batch, dy, axis)
    for _, out, grads, stats in paths.values():
        np.testing.assert_allclose(out, want_y, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, want_grads):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        for got, want in zip(stats, want_stats):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_options_the_kernel_cannot_take_use_the_general_path():
    x = _data((8, 2, 2, 3), 2)
    dy = _data((8, 2, 2, 3), 3, 0.0, 1.0)
    builds = {
        "virtual_batch_size": lambda t: tfbn_v1.batch_normalization(
            t, training=True, virtual_batch_size=4
        ),
        "adjustment": lambda t: tfbn_v1.batch_normalization(
            t, training=True, adjustment=lambda shape: (tf.constant(2.0), tf.constant(0.5))
        ),
        "batch_weights": lambda t: tfbn_v1.batch_norm(
            t, scale=True, batch_weights=tf.constant([1.0, 0.0, 2.0, 1.0, 1.0, 1.0, 0.5, 1.0])
        ),
        "two feature axes": lambda t: tfbn_v1.batch_normalization(t, axis=[1, 3], training=True),
    }
    for name, build in builds.items():
        op_types, out, grads, _ = _run(build, x, dy)
        assert FUSED_OP not in op_types, name
        assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in grads), name


def test_ghost_batch_gradient_wiring_delivers_the_core_gradients():
    batch, dy = _data((8, 3), 4), _data((8, 3), 5, 0.0, 1.0)
    _, out, grads, stats = _run(
        lambda t: tfbn_v1.batch_normalization(t, training=True, virtual_batch_size=4, momentum=0.5),
        batch,
        dy,
    )
    layer = tfbn.BatchNormalization(virtual_batch_size=4, momentum=0.5)
    want_y, *want_grads = forward_backward(layer, batch, dy)
    np.testing.assert_allclose(out, want_y, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats[0], layer.moving_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats[1], layer.moving_variance.numpy(), rtol=1e-6)


def test_fully_zero_batch_weights_normalize_with_the_moving_statistics():
    x_value = _data((4, 2), 6)
    with tf.Graph().as_default():
        y = tfbn_v1.batch_norm(
            tf.constant(x_value),
            batch_weights=tf.zeros([4]),
            decay=0.5,
            param_initializers={"moving_mean": tf.compat.v1.constant_initializer(1.0)},
            updates_collections=None,
            scope="bn",
        )
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            out = session.run(y)
            stats = session.run(tf.compat.v1.global_variables("bn/moving"))
    np.testing.assert_allclose(out, (x_value - 1.0) / np.sqrt(1.0 + 1e-3), rtol=1e-6)
    # No values, no update: the statistics stay at their initial values.
    assert np.array_equal(stats[0], np.ones(2, np.float32))
    assert np.array_equal(stats[1], np.ones(2, np.float32))
