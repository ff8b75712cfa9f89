"""Tests for `tfbn.compat.v1.batch_norm` (contrib/slim style, graph mode)."""

import numpy as np
import pytest
import tensorflow as tf

from tfbn.compat import v1 as tfbn_v1

GraphKeys = tf.compat.v1.GraphKeys


def _data(shape, seed=0, loc=5.0, scale=2.0):
    return np.random.default_rng(seed).normal(loc, scale, shape).astype(np.float32)


def _stat(scope, name):
    return tf.compat.v1.global_variables(f"{scope}/{name}")[0]


def test_names_defaults_and_collections():
    with tf.Graph().as_default():
        x = tf.zeros([2, 3])
        with tf.compat.v1.variable_scope("net"):
            y = tfbn_v1.batch_norm(
                x,
                variables_collections={"moving_mean": ["stats"]},
                outputs_collections="outputs",
                activation_fn=tf.nn.relu,
            )
            tfbn_v1.batch_norm(x, scale=True, trainable=False)
        names = [v.op.name for v in tf.compat.v1.global_variables()]
        # contrib's defaults: center=True, scale=False.
        assert names == [
            "net/BatchNorm/beta",
            "net/BatchNorm/moving_mean",
            "net/BatchNorm/moving_variance",
            "net/BatchNorm_1/gamma",
            "net/BatchNorm_1/beta",
            "net/BatchNorm_1/moving_mean",
            "net/BatchNorm_1/moving_variance",
        ]
        assert [v.op.name for v in tf.compat.v1.trainable_variables()] == ["net/BatchNorm/beta"]
        assert [v.op.name for v in tf.compat.v1.model_variables()] == names
        assert [v.op.name for v in tf.compat.v1.get_collection("stats")] == [
            "net/BatchNorm/moving_mean"
        ]
        assert tf.compat.v1.get_collection("outputs") == [y]
        assert y.op.type == "Relu"
        # is_training defaults to True: two update ops per call.
        assert len(tf.compat.v1.get_collection(GraphKeys.UPDATE_OPS, "net/BatchNorm_1")) == 2
        assert len(tf.compat.v1.get_collection(GraphKeys.UPDATE_OPS)) == 4


def test_default_decay_and_scenario_of_forgotten_update_ops():
    """PAIN_POINTS 1: exactly one EMA step per train step, convergence after 61."""
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, [64, 8])
        y = tfbn_v1.batch_norm(x, decay=0.9, scale=True, scope="bn")
        loss = tf.reduce_mean(tf.square(y))
        train_op = tfbn_v1.minimize_with_updates(
            tf.compat.v1.train.GradientDescentOptimizer(0.01), loss
        )
        mean, variance = _stat("bn", "moving_mean"), _stat("bn", "moving_variance")
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            first = _data((64, 8), 0)
            session.run(train_op, {x: first})
            np.testing.assert_allclose(session.run(mean), 0.1 * first.mean(0), rtol=1e-6)
            # contrib fused 2D inputs: the stored variance is Bessel-corrected.
            np.testing.assert_allclose(
                session.run(variance), 0.9 + 0.1 * first.var(0, ddof=1), rtol=1e-6
            )
            want_mean = 0.1 * first.mean(0).astype(np.float64)
            want_variance = 0.9 + 0.1 * first.var(0, ddof=1).astype(np.float64)
            for step in range(60):
                batch = _data((64, 8), step + 1)
                session.run(train_op, {x: batch})
                want_mean = 0.9 * want_mean + 0.1 * batch.mean(0)
                want_variance = 0.9 * want_variance + 0.1 * batch.var(0, ddof=1)
            got_mean, got_variance = session.run([mean, variance])
    np.testing.assert_allclose(got_mean, want_mean, rtol=1e-5)
    np.testing.assert_allclose(got_variance, want_variance, rtol=1e-5)
    # The EMA of 61 batches of N(5, 2^2) is near the population statistics.
    assert np.all(np.abs(got_mean - 5.0) < 0.25)
    assert np.all(np.abs(got_variance / 4.0 - 1.0) < 0.25)


def test_decay_equals_layers_style_momentum():
    x_value = _data((6, 4))
    results = []
    # fused=False: the same kernel on both sides, so the bits must agree.
    for build in (
        lambda x: tfbn_v1.batch_norm(x, decay=0.9, scale=True, fused=False),
        lambda x: tfbn_v1.batch_normalization(
            x, momentum=0.9, epsilon=0.001, training=True, fused=False
        ),
    ):
        with tf.Graph().as_default():
            y = build(tf.constant(x_value))
            with tf.compat.v1.Session() as session:
                session.run(tf.compat.v1.global_variables_initializer())
                out, _ = session.run([y, tf.compat.v1.get_collection(GraphKeys.UPDATE_OPS)])
                stats = [
                    session.run(v) for v in tf.compat.v1.global_variables() if "moving" in v.name
                ]
                results.append((out, stats))
    assert np.array_equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert np.array_equal(a, b)


def test_updates_collections_none_forces_update_with_output():
    x_value = _data((4, 3))
    with tf.Graph().as_default():
        y = tfbn_v1.batch_norm(
            tf.constant(x_value), decay=0.5, updates_collections=None, scope="bn"
        )
        assert tf.compat.v1.get_collection(GraphKeys.UPDATE_OPS) == []
        mean = _stat("bn", "moving_mean")
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run(y)
            np.testing.assert_allclose(session.run(mean), 0.5 * x_value.mean(0), rtol=1e-6)


@pytest.mark.parametrize("flag", [False, 0, np.bool_(False)])
def test_placeholder_and_spellings_of_is_training(flag):
    x_value = _data((4, 3))
    with tf.Graph().as_default():
        is_training = tf.compat.v1.placeholder(tf.bool, [])
        tfbn_v1.batch_norm(tf.constant(x_value), is_training=is_training, scope="fed")
        y = tfbn_v1.batch_norm(tf.constant(x_value), is_training=flag, scope="static")
        updates = tf.compat.v1.get_collection(GraphKeys.UPDATE_OPS)
        assert [op.name.split("/")[0] for op in updates] == ["fed", "fed"]
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            before = session.run(tf.compat.v1.global_variables("fed"))
            session.run(updates, {is_training: False})
            for old, new in zip(before, session.run(tf.compat.v1.global_variables("fed"))):
                assert np.array_equal(old, new)
            # Inference with the initial statistics (0, 1): x / sqrt(1 + eps).
            np.testing.assert_allclose(session.run(y), x_value / np.sqrt(1.001), rtol=1e-6)


def test_nchw_equals_nhwc():
    x_value = _data((4, 3, 2, 2))
    results = []
    for data_format, x in (("NCHW", x_value), ("NHWC", x_value.transpose(0, 2, 3, 1))):
        with tf.Graph().as_default():
            y = tfbn_v1.batch_norm(
                tf.constant(x), data_format=data_format, updates_collections=None, scope="bn"
            )
            with tf.compat.v1.Session() as session:
                session.run(tf.compat.v1.global_variables_initializer())
                out = session.run(y)
                results.append((out, session.run(_stat("bn", "moving_variance"))))
    assert tf.compat.v1.global_variables() == []
    np.testing.assert_allclose(results[0][0], results[1][0].transpose(0, 3, 1, 2), atol=1e-6)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6)


@pytest.mark.parametrize(
    "shape, kwargs, unbiased",
    [
        ((4, 1), {}, True),
        ((4, 1), {"fused": False}, False),
        ((2, 2, 1), {}, False),
        ((4, 1, 1, 1), {}, True),
    ],
)
def test_variance_convention_follows_tf1_fused_rule(shape, kwargs, unbiased):
    x_value = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(shape)
    with tf.Graph().as_default():
        y = tfbn_v1.batch_norm(
            tf.constant(x_value),
            decay=0.0,
            param_initializers={"moving_variance": tf.compat.v1.zeros_initializer()},
            updates_collections=None,
            scope="bn",
            **kwargs,
        )
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run(y)
            variance = session.run(_stat("bn", "moving_variance"))
    np.testing.assert_allclose(variance, [5.0 / 3.0 if unbiased else 1.25], rtol=1e-6)


def test_batch_weights_weight_the_statistics():
    x_value = _data((4, 2))
    weights = np.array([1.0, 0.0, 2.0, 1.0], np.float32)
    with tf.Graph().as_default():
        y = tfbn_v1.batch_norm(
            tf.constant(x_value),
            batch_weights=tf.constant(weights),
            decay=0.0,
            updates_collections=None,
            scope="bn",
        )
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            out = session.run(y)
            mean, variance = session.run(
                [_stat("bn", "moving_mean"), _stat("bn", "moving_variance")]
            )
    w = weights[:, None].astype(np.float64)
    want_mean = (w * x_value).sum(0) / w.sum()
    want_var = (w * (x_value - want_mean) ** 2).sum(0) / w.sum()
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5)
    np.testing.assert_allclose(variance, want_var, rtol=1e-5)
    np.testing.assert_allclose(out, (x_value - want_mean) / np.sqrt(want_var + 1e-3), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"param_initializers": {"gama": None}}, "param_initializers"),
        ({"param_regularizers": {"moving_mean": None}}, "param_regularizers"),
        ({"renorm": True, "renorm_clipping": {"rmx": 2.0}}, "renorm_clipping"),
        ({"zero_debias_moving_mean": True}, "zero_debias_moving_mean"),
        ({"data_format": "NCDHW"}, "data_format"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with tf.Graph().as_default(), pytest.raises(ValueError, match=match):
        tfbn_v1.batch_norm(tf.zeros([2, 3]), **kwargs)


@pytest.mark.parametrize(
    "decay, epsilon, match", [(1.5, 1e-3, "decay"), (0.9, float("inf"), "epsilon")]
)
def test_contrib_hyperparameters_use_the_shared_validation(decay, epsilon, match):
    with tf.Graph().as_default(), pytest.raises(ValueError, match=match):
        tfbn_v1.batch_norm(tf.zeros([4, 3]), decay=decay, epsilon=epsilon)
