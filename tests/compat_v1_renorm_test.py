"""Batch Renormalization in `tfbn.compat.v1` (both API styles), graph mode."""

import numpy as np
import pytest
import tensorflow as tf
from harness import forward_backward

import tfbn
from tfbn.compat import v1 as tfbn_v1

UPDATE_OPS = tf.compat.v1.GraphKeys.UPDATE_OPS
CLIPPING = {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}
RENORM_NAMES = ["moving_stddev", "renorm_mean", "renorm_stddev"]
# The tf-keras / Keras 3 renorm layout, in creation order.
LAYOUT = ["gamma", "beta", "moving_mean", "moving_variance"] + RENORM_NAMES
STEPS = 5


def _data(shape, seed, loc=2.0, scale=3.0):
    return np.random.default_rng(seed).normal(loc, scale, shape).astype(np.float32)


def _short_names(variables):
    return {v.op.name.rsplit("/", 1)[-1]: v for v in variables}


def _layers_style(x, training):
    return tfbn_v1.batch_normalization(
        x,
        training=training,
        momentum=0.9,
        epsilon=1e-3,
        renorm=True,
        renorm_clipping=CLIPPING,
        renorm_momentum=0.8,
    )


def _contrib_style(x, training):
    return tfbn_v1.batch_norm(
        x,
        is_training=training,
        decay=0.9,
        epsilon=1e-3,
        scale=True,
        renorm=True,
        renorm_clipping=CLIPPING,
        renorm_decay=0.8,
    )


@pytest.mark.parametrize(
    "build, placeholder_flag", [(_layers_style, False), (_contrib_style, True)]
)
def test_renorm_session_wiring_delivers_the_core_numbers_over_five_steps(build, placeholder_flag):
    shape = (6, 2, 2, 3)
    batches = [_data(shape, seed) for seed in range(STEPS)]
    dy = _data(shape, 99, 0.0, 1.0)
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, shape)
        training = tf.compat.v1.placeholder(tf.bool, []) if placeholder_flag else True
        y = build(x, training)
        variables = _short_names(tf.compat.v1.global_variables())
        gradients = tf.gradients(tf.reduce_sum(y * dy), [x, variables["gamma"], variables["beta"]])
        updates = tf.compat.v1.get_collection(UPDATE_OPS)
        assert len(updates) == 7 - 2  # Five statistics, one assign op each.
        feed = {training: True} if placeholder_flag else {}
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            # Output, gradients and updates in one run: the forward must read
            # the renorm statistics before the updates write them.
            steps = [
                session.run([y, gradients, updates], {**feed, x: batch})[:2] for batch in batches
            ]
            stored = {name: session.run(variables[name]) for name in LAYOUT[2:]}
    layer = tfbn.BatchNormalization(
        momentum=0.9, epsilon=1e-3, renorm=True, renorm_clipping=CLIPPING, renorm_momentum=0.8
    )
    for batch, (got_y, got_grads) in zip(batches, steps):
        want_y, *want_grads = forward_backward(layer, batch, dy)
        np.testing.assert_allclose(got_y, want_y, rtol=1e-6, atol=1e-6)
        for got, want in zip(got_grads, want_grads):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for name in LAYOUT[2:]:
        np.testing.assert_allclose(stored[name], getattr(layer, name).numpy(), rtol=1e-6, atol=1e-7)


def test_matches_numpy_reference():
    eps, momentum, renorm_momentum = 1e-3, 0.9, 0.8
    batches = [_data((6, 3), seed) for seed in range(3)]
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, [6, 3])
        y = _contrib_style(x, True)  # contrib: no fused kernel with renorm -> biased variance.
        variables = _short_names(tf.compat.v1.global_variables())
        updates = tf.compat.v1.get_collection(UPDATE_OPS)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            outputs = [session.run([y, updates], {x: batch})[0] for batch in batches]
            stored = {name: session.run(variables[name]) for name in LAYOUT[2:]}
    moving_mean, moving_stddev = np.zeros(3), np.ones(3)
    renorm_mean, renorm_stddev = np.zeros(3), np.ones(3)
    for batch, got in zip(batches, outputs):
        mean, stddev = (
            batch.mean(0, dtype=np.float64),
            np.sqrt(batch.var(0, dtype=np.float64) + eps),
        )
        floor = np.maximum(renorm_stddev, np.sqrt(eps))
        r = np.clip(stddev / floor, CLIPPING["rmin"], CLIPPING["rmax"])
        d = np.clip((mean - renorm_mean) / floor, -CLIPPING["dmax"], CLIPPING["dmax"])
        np.testing.assert_allclose(got, (batch - mean) / stddev * r + d, rtol=1e-5, atol=1e-5)
        moving_mean = momentum * moving_mean + (1 - momentum) * mean
        moving_stddev = momentum * moving_stddev + (1 - momentum) * stddev
        renorm_mean = renorm_momentum * renorm_mean + (1 - renorm_momentum) * mean
        renorm_stddev = renorm_momentum * renorm_stddev + (1 - renorm_momentum) * stddev
    want = {
        "moving_mean": moving_mean,
        "moving_variance": np.maximum(moving_stddev**2 - eps, 0.0),
        "moving_stddev": moving_stddev,
        "renorm_mean": renorm_mean,
        "renorm_stddev": renorm_stddev,
    }
    for name, value in want.items():
        np.testing.assert_allclose(stored[name], value, rtol=1e-5, err_msg=name)


def test_variable_layout_collections_and_update_ops():
    with tf.Graph().as_default():
        x = tf.zeros([4, 3])
        tfbn_v1.batch_normalization(
            x,
            training=True,
            renorm=True,
            name="layers",
            moving_variance_initializer=tf.compat.v1.constant_initializer(4.0),
        )
        tfbn_v1.batch_norm(
            x, scale=True, renorm=True, scope="contrib", variables_collections=["extra"]
        )
        layers_variables = tf.compat.v1.global_variables("layers")
        contrib_variables = tf.compat.v1.global_variables("contrib")
        assert [v.op.name for v in layers_variables] == [f"layers/{n}" for n in LAYOUT]
        assert [v.op.name for v in contrib_variables] == [f"contrib/{n}" for n in LAYOUT]
        assert [v.op.name for v in tf.compat.v1.trainable_variables()] == [
            "layers/gamma",
            "layers/beta",
            "contrib/gamma",
            "contrib/beta",
        ]
        assert tf.compat.v1.model_variables() == contrib_variables
        assert tf.compat.v1.get_collection("extra") == contrib_variables
        updates = [op.name for op in tf.compat.v1.get_collection(UPDATE_OPS, "layers")]
        assert updates == ["layers/AssignMovingAvg"] + [
            f"layers/AssignMovingAvg_{i}" for i in range(1, 5)
        ]
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            initial = session.run(_short_names(layers_variables))
    # The Keras layer's weights have the same names in the same order.
    keras_layer = tfbn.BatchNormalization(renorm=True)
    keras_layer.build((None, 3))
    assert [w.name for w in keras_layer.weights] == LAYOUT
    # Keras' rule: the stddevs start at sqrt(moving_variance initializer).
    assert np.array_equal(initial["moving_stddev"], np.full(3, 2.0, np.float32))
    assert np.array_equal(initial["renorm_stddev"], np.full(3, 2.0, np.float32))
    assert np.array_equal(initial["renorm_mean"], np.zeros(3, np.float32))


def test_fed_false_leaves_renorm_statistics_bit_identical_and_infers():
    batch = _data((4, 3), 0)
    with tf.Graph().as_default():
        training = tf.compat.v1.placeholder(tf.bool, [])
        y = _layers_style(tf.constant(batch), training)
        updates = tf.compat.v1.get_collection(UPDATE_OPS)
        variables = tf.compat.v1.global_variables()
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run(updates, {training: True})
            before = session.run(variables)
            got, _ = session.run([y, updates], {training: False})
            after = session.run(variables)
    for old, new in zip(before, after):
        assert np.array_equal(old, new)
    values = {v.op.name.rsplit("/", 1)[-1]: value for v, value in zip(variables, before)}
    want = (batch - values["moving_mean"]) / np.sqrt(values["moving_variance"] + 1e-3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fused_true_with_renorm_raises_as_tf1():
    with tf.Graph().as_default(), pytest.raises(ValueError, match="renorm"):
        tfbn_v1.batch_normalization(tf.zeros([2, 2, 2, 3]), renorm=True, fused=True)
