"""Tests for the deferred (UPDATE_OPS-style) update API."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfbn
from tfbn.deferred_updates import CollectorScopeError


def _two_part_model():
    inputs = keras.Input((4,))
    backbone = keras.Sequential(
        [keras.layers.Dense(4), tfbn.BatchNormalization(momentum=0.5, name="bn")], name="backbone"
    )
    head = keras.Sequential(
        [keras.layers.Dense(3), tfbn.BatchNormalization(momentum=0.5, name="bn")], name="head"
    )
    return keras.Model(inputs, head(backbone(inputs)))


def _moving(model, part):
    return model.get_layer(part).get_layer("bn").moving_mean.numpy().copy()


def _data(seed=0):
    return np.random.default_rng(seed).normal(2.0, 3.0, (8, 4)).astype(np.float32)


def test_outside_a_collector_updates_are_applied_at_call():
    model = _two_part_model()
    model(_data(), training=True)
    assert not np.array_equal(_moving(model, "backbone"), np.zeros(4))


def test_pending_updates_are_recorded_then_filtered_by_path():
    model = _two_part_model()
    with tfbn.deferred_updates() as updates:
        model(_data(), training=True)
        assert updates.paths == ["backbone/bn", "head/bn"]
        assert np.array_equal(_moving(model, "head"), np.zeros(3))
        updates.apply(include=r"head/")
        assert updates.paths == ["backbone/bn"]
        updates.discard()
    assert np.array_equal(_moving(model, "backbone"), np.zeros(4))
    assert not np.array_equal(_moving(model, "head"), np.zeros(3))


def test_exclude_and_apply_all_equal_eager_updates():
    deferred, eager = _two_part_model(), _two_part_model()
    eager.set_weights(deferred.get_weights())
    eager(_data(), training=True)
    with tfbn.deferred_updates() as updates:
        deferred(_data(), training=True)
        updates.apply(exclude=[r"head"])
        updates.apply()
    for a, b in zip(deferred.get_weights(), eager.get_weights()):
        assert np.array_equal(a, b)


def test_leaving_with_pending_updates_raises_and_names_them():
    model = _two_part_model()
    with pytest.raises(tfbn.UnappliedUpdatesError, match="backbone/bn"), tfbn.deferred_updates():
        model(_data(), training=True)


def test_an_error_inside_the_block_is_not_masked():
    model = _two_part_model()
    with pytest.raises(ZeroDivisionError), tfbn.deferred_updates():
        model(_data(), training=True)
        raise ZeroDivisionError


def test_pattern_matching_nothing_raises_with_known_paths():
    model = _two_part_model()
    with tfbn.deferred_updates() as updates:
        model(_data(), training=True)
        with pytest.raises(ValueError, match=r"'backbon/x'.*backbone/bn"):
            updates.apply(include=["backbon/x"])
        with pytest.raises(TypeError, match="include"):
            updates.apply(include=[3])
        updates.discard()


def test_layer_called_twice_records_two_updates_applied_in_order():
    layer = tfbn.BatchNormalization(momentum=0.5)
    first, second = _data(1), _data(2)
    with tfbn.deferred_updates() as updates:
        layer(first, training=True)
        layer(second, training=True)
        assert len(updates.pending) == 2
        updates.apply()
    expected = np.zeros(4)
    for batch in (first, second):
        expected = expected * 0.5 + batch.astype(np.float64).mean(0) * 0.5
    np.testing.assert_allclose(layer.moving_mean.numpy(), expected, rtol=1e-6)


def test_inside_tf_function_apply_returns_control_dependencies():
    model = _two_part_model()
    optimizer = keras.optimizers.SGD(0.1)
    head_vars = model.get_layer("head").trainable_variables
    optimizer.build(head_vars)

    @tf.function
    def step(x):
        with tfbn.deferred_updates() as updates:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(model(x, training=True) ** 2)
            grads = tape.gradient(loss, head_vars)
            optimizer.apply(grads, head_vars)
            ops = updates.apply(include="head/")
            updates.discard()
        with tf.control_dependencies(ops):
            return tf.identity(loss), len(ops)

    backbone_before = [w.copy() for w in model.get_layer("backbone").get_weights()]
    _, num_ops = step(_data())
    assert num_ops == 2
    for before, after in zip(backbone_before, model.get_layer("backbone").get_weights()):
        assert np.array_equal(before, after)
    assert not np.array_equal(_moving(model, "head"), np.zeros(3))


def test_collectors_nest_and_the_innermost_records():
    layer = tfbn.BatchNormalization()
    with tfbn.deferred_updates() as outer:
        with tfbn.deferred_updates() as inner:
            layer(_data(), training=True)
            inner.discard()
        assert outer.pending == ()


def test_apply_and_discard_select_by_layer_object():
    first = tfbn.BatchNormalization(momentum=0.0, name="bn")
    second = tfbn.BatchNormalization(momentum=0.0, name="bn_1")
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    with tfbn.deferred_updates() as updates:
        first(x, training=True)
        second(x, training=True)
        updates.apply(layers=[second])
        assert [update.layer for update in updates.pending] == [first]
        updates.discard(layers=[first])
    np.testing.assert_allclose(second.moving_mean.numpy(), x.mean(axis=0))
    np.testing.assert_array_equal(first.moving_mean.numpy(), np.zeros(3, np.float32))


def test_layers_argument_rejects_a_string():
    layer = tfbn.BatchNormalization()
    with tfbn.deferred_updates() as updates:
        layer(np.ones((2, 3), np.float32), training=True)
        with pytest.raises(TypeError, match="layers"):
            updates.apply(layers="bn")
        updates.discard()


def test_bad_regex_in_apply_or_discard_names_the_pattern_and_the_error():
    layer = tfbn.BatchNormalization()
    with tfbn.deferred_updates() as updates:
        layer(_data(), training=True)
        with pytest.raises(ValueError, match=r"include.*'head\[' .*unterminated character set"):
            updates.apply(include="head[")
        with pytest.raises(ValueError, match=r"exclude.*'\(bn' .*missing \)"):
            updates.discard(exclude=["(bn"])
        assert len(updates.pending) == 1
        updates.discard()


def test_eager_collector_refuses_a_layer_called_inside_a_tf_function():
    layer = tfbn.BatchNormalization(momentum=0.5)
    layer.build((8, 4))

    @tf.function
    def forward(x):
        return layer(x, training=True)

    with tfbn.deferred_updates() as updates:
        # Every call raises (a failed trace is not cached), not only the first.
        for _ in range(2):
            with pytest.raises(CollectorScopeError, match=r"(?s)tf\.function.*eager context"):
                forward(_data())
        assert updates.pending == ()
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(4, np.float32))


def test_model_fit_inside_a_collector_raises_before_the_first_step():
    model = _two_part_model()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = [w.copy() for w in model.get_weights()]
    expected = pytest.raises(CollectorScopeError, match="Open the collector inside the function")
    with expected, tfbn.deferred_updates():
        model.fit(_data(), np.zeros((8, 3), np.float32), epochs=2, verbose=0)
    for a, b in zip(before, model.get_weights()):
        assert np.array_equal(a, b)


def test_collector_of_one_function_refuses_a_nested_function_call():
    layer = tfbn.BatchNormalization()
    layer.build((8, 4))
    inner = tf.function(lambda x: layer(x, training=True))

    @tf.function
    def outer(x):
        with tfbn.deferred_updates() as updates:
            y = inner(x)
            updates.discard()
        return y

    with pytest.raises(CollectorScopeError, match="tf.function"):
        outer(_data())


def test_function_with_its_own_collector_works_inside_an_eager_collector():
    layer = tfbn.BatchNormalization(momentum=0.5)
    data = _data()

    @tf.function
    def step(x):
        with tfbn.deferred_updates() as updates:
            y = layer(x, training=True)
            updates.apply()
        return y

    with tfbn.deferred_updates() as outer:
        step(data)
        assert outer.pending == ()
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), data.astype(np.float64).mean(0) * 0.5, rtol=1e-6
    )
