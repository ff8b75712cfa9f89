"""Tests for `tfbn.compat.v1.batch_normalization` (tf.layers style, graph mode)."""

import importlib.util
import os
import sys

import numpy as np
import pytest
import reference
import tensorflow as tf

import tfbn
from tfbn.compat import v1 as tfbn_v1

UPDATE_OPS = tf.compat.v1.GraphKeys.UPDATE_OPS
FIXTURE_SCRIPT = os.path.join(os.path.dirname(__file__), "fixtures", "make_tf1_checkpoint.py")


def _load_fixture_module():
    spec = importlib.util.spec_from_file_location("make_tf1_checkpoint", FIXTURE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data(shape, seed=0, loc=2.0, scale=3.0):
    return np.random.default_rng(seed).normal(loc, scale, shape).astype(np.float32)


def _variables(scope):
    return {v.op.name.rsplit("/", 1)[-1]: v for v in tf.compat.v1.global_variables(scope)}


def _train_in_graph(batches, **kwargs):
    """Runs one train step per batch (update ops only); returns outputs and stats."""
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, batches[0].shape)
        y = tfbn_v1.batch_normalization(x, training=True, **kwargs)
        updates = tf.compat.v1.get_collection(UPDATE_OPS)
        variables = _variables("batch_normalization")
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            outputs = [session.run([y, updates], {x: batch})[0] for batch in batches]
            return (
                outputs,
                session.run(variables["moving_mean"]),
                session.run(variables["moving_variance"]),
            )


@pytest.mark.parametrize(
    "graph_kwargs, layer_estimator",
    [
        ({"fused": False}, "biased"),
        ({}, "unbiased"),
        ({"moving_variance_estimator": "biased"}, "biased"),
    ],
)
def test_session_wiring_delivers_the_core_numbers(graph_kwargs, layer_estimator):
    # Wiring, not numerics: the variables, reads and update ops of a TF1
    # Session must deliver what the shared core gives the Keras layer (the
    # core itself is pinned against NumPy in batch_normalization_test.py).
    batches = [_data((4, 3, 3, 5), seed) for seed in range(2)]
    outputs, mean, variance = _train_in_graph(batches, momentum=0.9, epsilon=1e-3, **graph_kwargs)
    layer = tfbn.BatchNormalization(
        momentum=0.9, epsilon=1e-3, moving_variance_estimator=layer_estimator
    )
    expected = [layer(tf.constant(batch), training=True).numpy() for batch in batches]
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mean, layer.moving_mean.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(variance, layer.moving_variance.numpy(), rtol=1e-6, atol=1e-7)


def test_variance_convention_fused_and_non_fused():
    # TF1's fused kernel (4D input) stored n/(n-1) * var; non-fused the biased var.
    x4 = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(4, 1, 1, 1)
    zeros = tf.compat.v1.zeros_initializer()
    cases = [
        (x4, {}, 5.0 / 3.0),
        (x4, {"fused": False}, 1.25),
        (x4.reshape(4, 1), {}, 1.25),
        (x4.reshape(4, 1), {"moving_variance_estimator": "unbiased"}, 5.0 / 3.0),
        (x4, {"fused": True, "moving_variance_estimator": "biased"}, 1.25),
    ]
    for x, kwargs, expected in cases:
        _, _, variance = _train_in_graph(
            [x], momentum=0.0, moving_variance_initializer=zeros, **kwargs
        )
        np.testing.assert_allclose(variance, [expected], rtol=1e-6)


def test_fused_true_where_tf1_could_not_fuse_raises():
    with tf.Graph().as_default(), pytest.raises(ValueError, match="fused=True"):
        tfbn_v1.batch_normalization(tf.zeros([4, 3]), fused=True)


def test_fused_path_raises_epsilon_to_tf1_floor():
    x = _data((4, 2, 2, 3))
    fused, _, _ = _train_in_graph([x], epsilon=1e-8)
    plain, _, _ = _train_in_graph([x], epsilon=1e-8, fused=False)
    y, _, _ = reference.batch_norm_train(x, np.ones(3), np.zeros(3), [-1], 1.001e-5)
    np.testing.assert_allclose(fused[0], y, atol=1e-5)
    y_plain, _, _ = reference.batch_norm_train(x, np.ones(3), np.zeros(3), [-1], 1e-8)
    np.testing.assert_allclose(plain[0], y_plain, atol=1e-5)


def test_variable_names_collections_and_update_ops():
    with tf.Graph().as_default():
        x = tf.zeros([2, 3])
        with tf.compat.v1.variable_scope("model"):
            tfbn_v1.batch_normalization(x, training=True, gamma_regularizer=tf.nn.l2_loss)
            tfbn_v1.batch_normalization(x, training=True, trainable=False)
        tfbn_v1.batch_normalization(x, training=False)
        names = [v.op.name for v in tf.compat.v1.global_variables()]
        stats = ["gamma", "beta", "moving_mean", "moving_variance"]
        assert names == (
            [f"model/batch_normalization/{n}" for n in stats]
            + [f"model/batch_normalization_1/{n}" for n in stats]
            + [f"batch_normalization/{n}" for n in stats]
        )
        trainable = [v.op.name for v in tf.compat.v1.trainable_variables()]
        assert trainable == [
            "model/batch_normalization/gamma",
            "model/batch_normalization/beta",
            "batch_normalization/gamma",
            "batch_normalization/beta",
        ]
        assert len(tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.REGULARIZATION_LOSSES)) == 1
        updates = [op.name for op in tf.compat.v1.get_collection(UPDATE_OPS)]
        # Two per training-mode call, none for the inference-mode call.
        assert updates == [
            "model/batch_normalization/AssignMovingAvg",
            "model/batch_normalization/AssignMovingAvg_1",
            "model/batch_normalization_1/AssignMovingAvg",
            "model/batch_normalization_1/AssignMovingAvg_1",
        ]
        assert len(tf.compat.v1.get_collection(UPDATE_OPS, "model/batch_normalization_1")) == 2


def test_placeholder_training_flag():
    x_value = _data((8, 3))
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 3])
        training = tf.compat.v1.placeholder(tf.bool, [])
        y = tfbn_v1.batch_normalization(
            x,
            training=training,
            momentum=0.9,
            moving_mean_initializer=tf.compat.v1.constant_initializer(0.5),
        )
        updates = tf.compat.v1.get_collection(UPDATE_OPS)
        variables = _variables("batch_normalization")
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            before = session.run([variables["moving_mean"], variables["moving_variance"]])
            eval_y, _ = session.run([y, updates], {x: x_value, training: False})
            after_false = session.run([variables["moving_mean"], variables["moving_variance"]])
            train_y, _ = session.run([y, updates], {x: x_value, training: True})
            after_true = session.run([variables["moving_mean"], variables["moving_variance"]])
    for old, new in zip(before, after_false):
        assert np.array_equal(old, new)
    np.testing.assert_allclose(
        eval_y,
        reference.batch_norm_inference(
            x_value, np.ones(3), np.zeros(3), np.full(3, 0.5), np.ones(3), [-1], 1e-3
        ),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        train_y,
        reference.batch_norm_train(x_value, np.ones(3), np.zeros(3), [-1], 1e-3)[0],
        atol=1e-5,
    )
    np.testing.assert_allclose(after_true[0], 0.9 * 0.5 + 0.1 * x_value.mean(0), rtol=1e-6)
    np.testing.assert_allclose(after_true[1], 0.9 + 0.1 * x_value.var(0), rtol=1e-6)


@pytest.mark.parametrize(
    "flag, same_as", [(1, True), (0, False), (np.bool_(True), True), (tf.constant(False), False)]
)
def test_training_flag_spellings_match_bool(flag, same_as):
    x_value = _data((4, 2))

    def build(training):
        with tf.Graph().as_default():
            training = tf.constant(False) if isinstance(training, tf.Tensor) else training
            y = tfbn_v1.batch_normalization(tf.constant(x_value), training=training)
            with tf.compat.v1.Session() as session:
                session.run(tf.compat.v1.global_variables_initializer())
                return session.run(y), len(tf.compat.v1.get_collection(UPDATE_OPS))

    got, want = build(flag), build(same_as)
    assert np.array_equal(got[0], want[0]) and got[1] == want[1]


@pytest.mark.parametrize("flag", [2, "True", 0.0])
def test_training_flag_misspellings_raise(flag):
    with tf.Graph().as_default(), pytest.raises(TypeError, match="training"):
        tfbn_v1.batch_normalization(tf.zeros([2, 2]), training=flag)


def test_reuse_shares_variables_and_updates_once_per_call():
    with tf.Graph().as_default():
        a = tf.constant(_data((4, 2), 1))
        b = tf.constant(_data((4, 2), 2))
        tfbn_v1.batch_normalization(a, training=True, name="bn", momentum=0.5)
        with pytest.raises(ValueError, match="already exists"):
            tfbn_v1.batch_normalization(b, training=True, name="bn")
        tfbn_v1.batch_normalization(b, training=True, name="bn", reuse=True, momentum=0.5)
        assert len(tf.compat.v1.global_variables()) == 4
        updates = tf.compat.v1.get_collection(UPDATE_OPS)
        assert len(updates) == 4
        mean = _variables("bn")["moving_mean"]
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run(updates[0])
            session.run(updates[2])
            got = session.run(mean)
    a_mean, b_mean = _data((4, 2), 1).mean(0), _data((4, 2), 2).mean(0)
    np.testing.assert_allclose(got, 0.5 * (0.5 * a_mean) + 0.5 * b_mean, rtol=1e-6)


def test_nchw_axis_1_equals_nhwc():
    x = _data((4, 3, 2, 2))
    nchw, mean_1, var_1 = _train_in_graph([x], axis=1, momentum=0.5)
    nhwc, mean_3, var_3 = _train_in_graph([x.transpose(0, 2, 3, 1)], axis=3, momentum=0.5)
    np.testing.assert_allclose(nchw[0], nhwc[0].transpose(0, 3, 1, 2), atol=1e-6)
    np.testing.assert_allclose(mean_1, mean_3, rtol=1e-6)
    np.testing.assert_allclose(var_1, var_3, rtol=1e-6)


def test_ghost_batch_and_adjustment_wiring_deliver_the_core_numbers():
    x = _data((8, 3))
    outputs, mean, _ = _train_in_graph([x], virtual_batch_size=4, momentum=0.0)
    layer = tfbn.BatchNormalization(virtual_batch_size=4, momentum=0.0)
    np.testing.assert_allclose(outputs[0], layer(tf.constant(x), training=True).numpy(), atol=1e-6)
    np.testing.assert_allclose(mean, layer.moving_mean.numpy(), rtol=1e-6)

    def adjustment(shape):
        del shape
        return tf.constant(2.0), tf.constant(0.5)

    adjusted, _, _ = _train_in_graph([x], adjustment=adjustment)
    plain, _, _ = _train_in_graph([x])
    np.testing.assert_allclose(adjusted[0], plain[0] * 2.0 + 0.5, atol=1e-6)


def test_adjustment_gets_the_ghost_batch_view_as_in_tf_layers():
    x = _data((8, 3))
    ghost, per_ghost = 4, 2
    rng = np.random.default_rng(7)
    adjust_scale = rng.uniform(0.5, 1.5, (ghost, per_ghost, 1)).astype(np.float32)
    adjust_bias = rng.normal(0.0, 0.1, (ghost, per_ghost, 1)).astype(np.float32)
    seen_shapes = []

    def adjustment(shape):
        seen_shapes.append(shape)
        return tf.constant(adjust_scale), tf.constant(adjust_bias)

    gamma_init = tf.compat.v1.constant_initializer(1.5)
    outputs, _, _ = _train_in_graph(
        [x], virtual_batch_size=ghost, adjustment=adjustment, gamma_initializer=gamma_init
    )
    assert len(seen_shapes) == 1 and seen_shapes[0].shape.as_list() == [3]
    view = x.reshape(ghost, per_ghost, 3).astype(np.float64)
    x_hat = (view - view.mean(0)) / np.sqrt(view.var(0) + 1e-3)
    want = 1.5 * (adjust_scale * x_hat + adjust_bias)
    np.testing.assert_allclose(outputs[0], want.reshape(8, 3), rtol=1e-5, atol=1e-5)


def test_saver_round_trip(tmp_path):
    batch = _data((6, 2, 2, 3))
    prefix = str(tmp_path / "model.ckpt")
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, batch.shape)
        training = tf.compat.v1.placeholder_with_default(False, [])
        y = tfbn_v1.batch_normalization(x, training=training, momentum=0.5)
        updates = tf.compat.v1.get_collection(UPDATE_OPS)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            for _ in range(3):
                session.run(updates, {x: batch, training: True})
            saved = session.run(tf.compat.v1.global_variables())
            eval_before = session.run(y, {x: batch})
            tf.compat.v1.train.Saver().save(session, prefix)
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, batch.shape)
        y = tfbn_v1.batch_normalization(x, training=False)
        with tf.compat.v1.Session() as session:
            tf.compat.v1.train.Saver().restore(session, prefix)
            restored = session.run(tf.compat.v1.global_variables())
            eval_after = session.run(y, {x: batch})
    for a, b in zip(saved, restored):
        assert np.array_equal(a, b)
    assert np.array_equal(eval_before, eval_after)


def test_restores_tf1_fixture_checkpoint():
    fixture = _load_fixture_module()
    x_value = _data((5, fixture.NUM_CHANNELS))
    with tf.Graph().as_default():
        x = tf.constant(x_value)
        y = tfbn_v1.batch_normalization(x)
        with tf.compat.v1.Session() as session:
            tf.compat.v1.train.Saver().restore(session, fixture.CHECKPOINT_PREFIX)
            values = {v.op.name: session.run(v) for v in tf.compat.v1.global_variables()}
            output = session.run(y)
    assert set(values) == set(fixture.FIXTURE_VALUES)
    for name, value in fixture.FIXTURE_VALUES.items():
        assert np.array_equal(values[name], value)
    v = fixture.FIXTURE_VALUES
    expected = reference.batch_norm_inference(
        x_value,
        v["batch_normalization/gamma"],
        v["batch_normalization/beta"],
        v["batch_normalization/moving_mean"],
        v["batch_normalization/moving_variance"],
        [-1],
        1e-3,
    )
    np.testing.assert_allclose(output, expected, atol=1e-5)


def test_no_tf_keras_and_no_tf_compat_v1_layers(monkeypatch):
    class Forbidden:
        def __getattr__(self, name):
            raise AssertionError(f"tf.compat.v1.layers.{name} was accessed")

    monkeypatch.setattr(tf.compat.v1, "layers", Forbidden())
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, [4, 2, 2, 3])
        y = tfbn_v1.batch_normalization(x, training=True)
        y = tfbn_v1.batch_norm(y)
        train_op = tfbn_v1.minimize_with_updates(
            tf.compat.v1.train.AdamOptimizer(0.1), tf.reduce_sum(y * y)
        )
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run(train_op, {x: _data((4, 2, 2, 3))})
    assert "tf_keras" not in sys.modules


def test_wrap_function_runs_updates():
    x_value = _data((4, 3))

    def step(x):
        y = tfbn_v1.batch_normalization(x, training=True, momentum=0.5, name="wrapped")
        with tf.control_dependencies(tf.compat.v1.get_collection(UPDATE_OPS)):
            return tf.identity(y)

    wrapped = tf.compat.v1.wrap_function(step, [tf.TensorSpec([4, 3], tf.float32)])
    mean_variable = wrapped.variables[
        [v.name for v in wrapped.variables].index("wrapped/moving_mean:0")
    ]
    output = wrapped(tf.constant(x_value))
    np.testing.assert_allclose(
        output.numpy(),
        reference.batch_norm_train(x_value, np.ones(3), np.zeros(3), [-1], 1e-3)[0],
        atol=1e-5,
    )
    np.testing.assert_allclose(mean_variable.numpy(), 0.5 * x_value.mean(0), rtol=1e-6)
    wrapped(tf.constant(x_value))
    np.testing.assert_allclose(mean_variable.numpy(), 0.75 * x_value.mean(0), rtol=1e-6)


@pytest.mark.parametrize("static_batch", [True, False])
def test_one_value_per_feature_outputs_beta_and_keeps_the_statistics(static_batch):
    # The same rule as the Keras layer, whether the batch size is known or not.
    x_value = _data((1, 3), seed=4)
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, x_value.shape if static_batch else [None, 3])
        y = tfbn_v1.batch_normalization(
            x, training=True, beta_initializer=tf.compat.v1.constant_initializer(0.5)
        )
        updates = tf.compat.v1.get_collection(UPDATE_OPS)
        variables = _variables("batch_normalization")
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            output, _ = session.run([y, updates], {x: x_value})
            mean, variance = session.run([variables["moving_mean"], variables["moving_variance"]])
    np.testing.assert_allclose(output, np.full((1, 3), 0.5), atol=1e-6)
    np.testing.assert_array_equal(mean, np.zeros(3, np.float32))
    np.testing.assert_array_equal(variance, np.ones(3, np.float32))
