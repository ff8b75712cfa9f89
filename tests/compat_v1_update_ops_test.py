"""Tests for the train-op wiring: dependency checks, minimize and apply_gradients."""

import warnings

import numpy as np
import pytest
import tensorflow as tf

from tfbn.compat import v1 as tfbn_v1

UPDATE_OPS = tf.compat.v1.GraphKeys.UPDATE_OPS
STATS = ("moving_mean", "moving_variance")


def _model(scope, x):
    """Two BN layers with a dense kernel between them."""
    with tf.compat.v1.variable_scope(scope):
        y = tfbn_v1.batch_norm(x, scale=True, decay=0.5, scope="bn1")
        kernel = tf.compat.v1.get_variable(
            "kernel", [3, 3], initializer=tf.compat.v1.ones_initializer()
        )
        y = tfbn_v1.batch_norm(tf.matmul(y, kernel), decay=0.5, scope="bn2")
    return tf.reduce_mean(tf.square(y))


def test_train_op_of_one_model_carries_exactly_its_update_ops():
    with tf.Graph().as_default():
        x = tf.constant(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32))
        with pytest.raises(ValueError, match="no BN update ops found in scope 'a'"):
            tfbn_v1.minimize_with_updates(
                tf.compat.v1.train.GradientDescentOptimizer(0.1), tf.reduce_sum(x), update_scope="a"
            )
        loss_a = _model("a", x)
        train_a = tfbn_v1.minimize_with_updates(
            tf.compat.v1.train.GradientDescentOptimizer(0.1), loss_a, var_list="a", update_scope="a"
        )
        _model("b", x)
        found = tfbn_v1.check_update_dependencies(train_a, scope="a")
        assert sorted(op.name for op in found) == [
            "a/bn1/AssignMovingAvg",
            "a/bn1/AssignMovingAvg_1",
            "a/bn2/AssignMovingAvg",
            "a/bn2/AssignMovingAvg_1",
        ]
        with pytest.raises(tfbn_v1.MissingUpdateDependenciesError) as error:
            tfbn_v1.check_update_dependencies(train_a)
        for name in ("b/bn1/AssignMovingAvg", "b/bn2/AssignMovingAvg_1"):
            assert name in str(error.value)
        assert "a/bn1/" not in str(error.value)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            b_before = session.run(tf.compat.v1.global_variables("b"))
            a_mean_before = session.run(tf.compat.v1.global_variables("a/bn1/moving_mean")[0])
            session.run(train_a)
            for old, new in zip(b_before, session.run(tf.compat.v1.global_variables("b"))):
                assert np.array_equal(old, new)
            a_mean = session.run(tf.compat.v1.global_variables("a/bn1/moving_mean")[0])
            assert not np.array_equal(a_mean, a_mean_before)


def test_checker_catches_a_train_op_without_updates_and_accepts_tensors():
    with tf.Graph().as_default():
        loss = _model("m", tf.ones([4, 3]) * tf.range(4.0)[:, None])
        bare = tf.compat.v1.train.GradientDescentOptimizer(0.1).minimize(loss)
        with pytest.raises(tfbn_v1.MissingUpdateDependenciesError, match="4 of the 4"):
            tfbn_v1.check_update_dependencies(bare)
        # A scope without update ops has nothing to check.
        assert tfbn_v1.check_update_dependencies(bare, scope="elsewhere") == []
        with tf.control_dependencies(tf.compat.v1.get_collection(UPDATE_OPS)):
            wired_tensor = tf.identity(loss)
        assert len(tfbn_v1.check_update_dependencies(wired_tensor)) == 4


def test_var_list_scope_global_step_and_errors():
    with tf.Graph().as_default():
        loss = _model("m", tf.ones([4, 3]) * tf.range(4.0)[:, None])
        optimizer = tf.compat.v1.train.GradientDescentOptimizer(0.1)
        with pytest.raises(ValueError, match="'m/bn9'"):
            tfbn_v1.minimize_with_updates(optimizer, loss, var_list="m/bn9")
        with pytest.raises(TypeError, match="tf.compat.v1.train.Optimizer"):
            tfbn_v1.minimize_with_updates(object(), loss)
        global_step = tf.compat.v1.train.get_or_create_global_step()
        train_op = tfbn_v1.minimize_with_updates(
            optimizer, loss, var_list=["m/bn2"], global_step=global_step
        )
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            frozen = tf.compat.v1.trainable_variables("m/bn1") + tf.compat.v1.trainable_variables(
                "m/kernel"
            )
            before = session.run(frozen)
            session.run(train_op)
            for old, new in zip(before, session.run(frozen)):
                assert np.array_equal(old, new)
            assert session.run(global_step) == 1


def test_batch_norm_inside_cond_branch():
    with tf.Graph().as_default():
        x = tf.ones([4, 2]) * tf.range(4.0)[:, None]
        flag = tf.compat.v1.placeholder(tf.bool, [])
        with pytest.raises(ValueError, match="tf.cond"):
            tf.compat.v1.cond(flag, lambda: tfbn_v1.batch_norm(x, scope="in_cond"), lambda: x)
    with tf.Graph().as_default():
        x = tf.ones([4, 2]) * tf.range(4.0)[:, None]
        flag = tf.compat.v1.placeholder(tf.bool, [])
        y = tf.compat.v1.cond(
            flag,
            lambda: tfbn_v1.batch_norm(x, decay=0.5, updates_collections=None, scope="bn"),
            lambda: x,
        )
        mean = tf.compat.v1.global_variables("bn/moving_mean")[0]
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run(y, {flag: True})
            np.testing.assert_allclose(session.run(mean), [0.75, 0.75], rtol=1e-6)


# Columns with exact float32 moments: means (3, 6, 1), unbiased variances (2.5, 10, 5).
_EXACT_BATCH = np.array([[1, 2, 0], [2, 4, 0], [3, 6, 0], [4, 8, 0], [5, 10, 5]], dtype=np.float32)


def _clipped_model(x):
    with tf.compat.v1.variable_scope("m"):
        y = tfbn_v1.batch_norm(x, scale=True, decay=0.5, scope="bn")
        kernel = tf.compat.v1.get_variable(
            "kernel", [3, 2], initializer=tf.compat.v1.constant_initializer(3.0)
        )
        return tf.reduce_sum(tf.square(tf.matmul(y, kernel)))


def test_apply_gradients_with_updates_clipped_step_updates_statistics_exactly():
    with tf.Graph().as_default():
        loss = _clipped_model(tf.constant(_EXACT_BATCH))
        optimizer = tf.compat.v1.train.GradientDescentOptimizer(0.1)
        grads, variables = zip(*optimizer.compute_gradients(loss))
        clipped, _ = tf.clip_by_global_norm(grads, 1.0)
        global_step = tf.compat.v1.train.get_or_create_global_step()
        train_op = tfbn_v1.apply_gradients_with_updates(
            optimizer, zip(clipped, variables), update_scope="m", global_step=global_step
        )
        assert len(tfbn_v1.check_update_dependencies(train_op, scope="m")) == 2
        mean, variance = (tf.compat.v1.global_variables(f"m/bn/{n}")[0] for n in STATS)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            before = session.run(list(variables))
            clipped_values, raw_values = session.run([clipped, grads])
            session.run(train_op)
            after = session.run(list(variables))
            # One EMA step from (0, 1) with decay 0.5 and the fused path's
            # Bessel-corrected variance: all exact in float32.
            assert np.array_equal(session.run(mean), np.array([1.5, 3.0, 0.5], np.float32))
            assert np.array_equal(session.run(variance), np.array([1.75, 5.5, 3.0], np.float32))
            assert session.run(global_step) == 1
    assert np.linalg.norm(np.concatenate([g.ravel() for g in raw_values])) > 1.0
    for old, new, step in zip(before, after, clipped_values):
        np.testing.assert_allclose(new, old - 0.1 * step, rtol=1e-6, atol=1e-7)


def test_apply_gradients_with_updates_checks_its_arguments():
    with tf.Graph().as_default():
        loss = _clipped_model(tf.constant(_EXACT_BATCH))
        optimizer = tf.compat.v1.train.GradientDescentOptimizer(0.1)
        pairs = optimizer.compute_gradients(loss)
        with pytest.raises(TypeError, match="tf.compat.v1.train.Optimizer"):
            tfbn_v1.apply_gradients_with_updates(object(), pairs)
        with pytest.raises(ValueError, match="`grads_and_vars` is empty"):
            tfbn_v1.apply_gradients_with_updates(optimizer, [])
        with pytest.raises(TypeError, match="pairs"):
            tfbn_v1.apply_gradients_with_updates(optimizer, [pairs[0][1]])
        with pytest.raises(ValueError, match="no BN update ops found in scope 'head'"):
            tfbn_v1.apply_gradients_with_updates(optimizer, pairs, update_scope="head")


def test_training_moving_statistics_warns_naming_them():
    with tf.Graph().as_default():
        loss = _clipped_model(tf.constant(_EXACT_BATCH))
        optimizer = tf.compat.v1.train.GradientDescentOptimizer(0.1)
        everything = tf.compat.v1.global_variables()
        expected = r"2 BN moving-statistics variable\(s\): \['m/bn/moving_mean', 'm/bn/moving_va"
        with pytest.warns(UserWarning, match="`grads_and_vars` contains " + expected):
            tfbn_v1.apply_gradients_with_updates(
                optimizer, optimizer.compute_gradients(loss, var_list=everything)
            )
        with pytest.warns(UserWarning, match="`var_list` contains " + expected):
            tfbn_v1.minimize_with_updates(optimizer, loss, var_list=everything)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tfbn_v1.minimize_with_updates(optimizer, loss, var_list="m")
