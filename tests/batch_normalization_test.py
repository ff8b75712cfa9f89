"""Tests for tfbn.BatchNormalization against NumPy and the stock Keras layer."""

import os

import keras
import numpy as np
import pytest
import reference
import tensorflow as tf
from harness import forward_backward

import tfbn

RNG = np.random.default_rng(1234)


def _normal(shape, mean=0.0, std=1.0, seed=None):
    rng = RNG if seed is None else np.random.default_rng(seed)
    return rng.normal(mean, std, shape).astype(np.float32)


def _randomize(layer, seed=0):
    """Gives every weight a distinct non-trivial value (variances positive)."""
    rng = np.random.default_rng(seed)
    layer.set_weights(
        [
            (
                rng.uniform(0.5, 2.0, w.shape)
                if "variance" in v.name or "stddev" in v.name
                else rng.normal(0, 1, w.shape)
            ).astype(w.dtype)
            for v, w in zip(layer.weights, layer.get_weights())
        ]
    )


# --------------------------------------------------------------------------
# Forward and backward against NumPy


CASES = [
    ((32, 5), -1),
    ((8, 6, 4), -1),
    ((8, 4, 6), 1),
    ((4, 5, 5, 3), -1),
    ((4, 3, 5, 5), 1),
    ((4, 5, 6, 3), [2, 3]),
    ((2, 3, 4, 4, 3), -1),
    ((2, 3, 4, 4, 5), [1, 4]),
]


@pytest.mark.parametrize("shape, axis", CASES)
@pytest.mark.parametrize(
    "center, scale", [(True, True), (False, True), (True, False), (False, False)]
)
def test_training_forward_and_backward_match_numpy(shape, axis, center, scale):
    x = _normal(shape, mean=1.5, std=2.0)
    layer = tfbn.BatchNormalization(axis=axis, center=center, scale=scale, epsilon=1e-3)
    layer.build(shape)
    _randomize(layer)
    feature_axes = axis if isinstance(axis, list) else [axis]
    param_shape = [shape[a] for a in sorted(a % len(shape) for a in feature_axes)]
    gamma = layer.gamma.numpy() if scale else np.ones(param_shape)
    beta = layer.beta.numpy() if center else np.zeros(param_shape)
    dy = _normal(shape, seed=7)

    y, *grads = forward_backward(layer, x, dy)

    y_ref, _, _ = reference.batch_norm_train(x, gamma, beta, feature_axes, 1e-3)
    dx_ref, dgamma_ref, dbeta_ref = reference.batch_norm_train_grad(
        x, gamma, dy, feature_axes, 1e-3
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads[0], dx_ref, rtol=1e-3, atol=1e-4)
    rest = grads[1:]
    if scale:
        np.testing.assert_allclose(rest.pop(0).reshape(-1), dgamma_ref, rtol=1e-3, atol=1e-3)
    if center:
        np.testing.assert_allclose(rest.pop(0).reshape(-1), dbeta_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("shape, axis", CASES)
def test_inference_matches_numpy(shape, axis):
    x = _normal(shape, mean=-1.0, std=3.0)
    layer = tfbn.BatchNormalization(axis=axis)
    layer.build(shape)
    _randomize(layer, seed=3)
    feature_axes = axis if isinstance(axis, list) else [axis]
    gamma, beta, mean, var = layer.get_weights()
    expected = reference.batch_norm_inference(x, gamma, beta, mean, var, feature_axes, 1e-3)
    np.testing.assert_allclose(layer(x, training=False).numpy(), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Moving statistics: exact sequences


def _ema_sequence(batches, momentum, estimator="biased", axes=(0,)):
    mean, var = np.zeros(batches[0].shape[-1]), np.ones(batches[0].shape[-1])
    for batch in batches:
        b = batch.astype(np.float64)
        n = np.prod([b.shape[a] for a in axes])
        batch_var = b.var(axis=axes)
        if estimator == "unbiased":
            batch_var = batch_var * n / (n - 1)
        mean = momentum * mean + (1 - momentum) * b.mean(axis=axes)
        var = momentum * var + (1 - momentum) * batch_var
    return mean, var


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_exponential_moving_average_after_k_steps(estimator):
    batches = [_normal((16, 3), mean=2.0, std=3.0, seed=s) for s in range(7)]
    layer = tfbn.BatchNormalization(momentum=0.9, moving_variance_estimator=estimator)
    for batch in batches:
        layer(batch, training=True)
    mean, var = _ema_sequence(batches, 0.9, estimator)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5)


def test_documented_variance_convention_on_one_to_four():
    # PAIN_POINTS 16: x = [1, 2, 3, 4], momentum 0 must not raise.
    x = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    for estimator, expected in (("biased", 1.25), ("unbiased", 5.0 / 3.0)):
        layer = tfbn.BatchNormalization(
            momentum=0.0, moving_variance_initializer="zeros", moving_variance_estimator=estimator
        )
        layer(x, training=True)
        np.testing.assert_allclose(layer.moving_variance.numpy(), [expected], rtol=1e-6)


def test_cumulative_average_and_reset():
    batches = [_normal((10, 4), mean=s, seed=s) for s in range(5)]
    layer = tfbn.BatchNormalization(momentum=None)
    layer(_normal((10, 4), mean=100.0), training=True)
    layer.reset_moving_statistics()
    assert layer.num_batches_tracked.numpy() == 0
    assert np.array_equal(layer.moving_mean.numpy(), np.zeros(4, np.float32))
    for batch in batches:
        layer(batch, training=True)
    stacked = np.stack([b.astype(np.float64) for b in batches])
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), stacked.mean(axis=1).mean(axis=0), rtol=1e-5
    )
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), stacked.var(axis=1).mean(axis=0), rtol=1e-5
    )
    assert layer.num_batches_tracked.numpy() == 5


def test_custom_loop_ten_steps_tracks_the_data_mean():
    # PAIN_POINTS 6: momentum 0.9, 10 steps on N(2, 3^2).
    layer = tfbn.BatchNormalization(momentum=0.9)
    for step in range(10):
        layer(_normal((256, 1), 2.0, 3.0, seed=step), training=True)
    np.testing.assert_allclose(layer.moving_mean.numpy(), [(1 - 0.9**10) * 2.0], rtol=0.05)
    before = layer.get_weights()
    for flag in (None, False):
        layer(_normal((256, 1), 2.0, 3.0), training=flag)
    for a, b in zip(before, layer.get_weights()):
        assert np.array_equal(a, b)


# --------------------------------------------------------------------------
# Parity with keras.layers.BatchNormalization


def test_weights_interchange_with_the_stock_layer():
    stock = keras.layers.BatchNormalization(axis=1)
    ours = tfbn.BatchNormalization(axis=1)
    x = _normal((8, 3, 5, 5), mean=2.0)
    stock.build(x.shape)
    ours.build(x.shape)
    assert [w.name for w in ours.weights] == [w.name for w in stock.weights]
    _randomize(stock)
    ours.set_weights(stock.get_weights())
    assert np.array_equal(ours(x, training=False).numpy(), stock(x, training=False).numpy())
    np.testing.assert_allclose(
        ours(x, training=True).numpy(), stock(x, training=True).numpy(), rtol=1e-5, atol=1e-5
    )
    stock.set_weights(ours.get_weights())
    for a, b in zip(stock.get_weights(), ours.get_weights()):
        assert np.array_equal(a, b)


def test_renorm_matches_the_stock_layer_over_five_steps():
    kwargs = {
        "renorm": True,
        "renorm_clipping": {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5},
        "renorm_momentum": 0.8,
        "momentum": 0.9,
    }
    stock = keras.layers.BatchNormalization(**kwargs)
    ours = tfbn.BatchNormalization(**kwargs)
    stock.build((16, 3))
    ours.build((16, 3))
    assert [w.name for w in ours.weights] == [w.name for w in stock.weights]
    ours.set_weights(stock.get_weights())
    for step in range(5):
        x = _normal((16, 3), mean=step, std=1 + step, seed=step)
        np.testing.assert_allclose(
            ours(x, training=True).numpy(), stock(x, training=True).numpy(), rtol=1e-4, atol=1e-5
        )
    for a, b in zip(ours.get_weights(), stock.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_renorm_matches_numpy_reference():
    eps, rmax, dmax, mom, rmom = 1e-3, 1.2, 0.3, 0.9, 0.5
    layer = tfbn.BatchNormalization(
        renorm=True,
        renorm_clipping={"rmax": rmax, "rmin": 1 / rmax, "dmax": dmax},
        renorm_momentum=rmom,
        momentum=mom,
        epsilon=eps,
        center=False,
        scale=False,
    )
    renorm_mean, renorm_std = np.zeros(2), np.sqrt(np.ones(2))
    for step in range(5):
        x = _normal((32, 2), mean=3.0, std=4.0, seed=step)
        y = layer(x, training=True).numpy()
        m, v = x.astype(np.float64).mean(0), x.astype(np.float64).var(0)
        s = np.sqrt(v + eps)
        r = np.clip(s / np.maximum(renorm_std, np.sqrt(eps)), 1 / rmax, rmax)
        d = np.clip((m - renorm_mean) / np.maximum(renorm_std, np.sqrt(eps)), -dmax, dmax)
        np.testing.assert_allclose(y, (x - m) / s * r + d, rtol=1e-4, atol=1e-4)
        renorm_mean = rmom * renorm_mean + (1 - rmom) * m
        renorm_std = rmom * renorm_std + (1 - rmom) * s
    np.testing.assert_allclose(layer.renorm_mean.numpy(), renorm_mean, rtol=1e-5)
    np.testing.assert_allclose(layer.renorm_stddev.numpy(), renorm_std, rtol=1e-5)


def test_moving_statistics_after_fit_match_the_stock_layer():
    def build(bn):
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(5), bn, keras.layers.Dense(1)]
        )

    x, y = _normal((64, 6), seed=1), _normal((64, 1), seed=2)
    models = [
        build(keras.layers.BatchNormalization(momentum=0.8)),
        build(tfbn.BatchNormalization(momentum=0.8)),
    ]
    models[1].set_weights(models[0].get_weights())
    for model in models:
        model.compile(keras.optimizers.SGD(0.01), "mse")
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(models[0].layers[1].get_weights(), models[1].layers[1].get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        models[0].predict(x, verbose=0), models[1].predict(x, verbose=0), rtol=1e-4, atol=1e-4
    )


# --------------------------------------------------------------------------
# trainable x training, inside and outside fit


def test_frozen_layer_runs_in_inference_mode_without_updates_but_passes_gradients():
    # PAIN_POINTS 4.
    layer = tfbn.BatchNormalization()
    layer.build((64, 2))
    layer.set_weights(
        [
            np.full(2, 1.5, np.float32),
            np.full(2, 0.2, np.float32),
            np.full(2, 3.0, np.float32),
            np.full(2, 4.0, np.float32),
        ]
    )
    layer.trainable = False
    assert layer.trainable_weights == []
    x = tf.constant(_normal((64, 2)))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
    np.testing.assert_allclose(
        y.numpy(), 1.5 * (x.numpy() - 3.0) / np.sqrt(4.0 + 1e-3) + 0.2, rtol=1e-5, atol=1e-6
    )
    assert np.array_equal(layer.moving_mean.numpy(), np.full(2, 3.0, np.float32))
    assert np.all(tape.gradient(y, x).numpy() != 0)
    layer.trainable = True
    layer(x, training=True)
    assert not np.array_equal(layer.moving_mean.numpy(), np.full(2, 3.0, np.float32))


def test_frozen_base_stays_frozen_inside_fit_and_thaws_after_recompile():
    base = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4), tfbn.BatchNormalization(name="bn")], name="base"
    )
    model = keras.Sequential([base, keras.layers.Dense(1)])
    x, y = _normal((32, 4), mean=3.0), _normal((32, 1))
    base.trainable = False
    frozen = [w.copy() for w in base.get_weights()]
    model.compile("adam", "mse")
    model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    for a, b in zip(frozen, base.get_weights()):
        assert np.array_equal(a, b)
    base.trainable = True
    model.compile("adam", "mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert not np.array_equal(frozen[2], base.get_layer("bn").moving_mean.numpy())


@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("training", [True, False, None])
def test_mode_table(trainable, training):
    layer = tfbn.BatchNormalization(trainable=trainable)
    x = _normal((16, 3), mean=5.0)
    inference = layer(x, training=False).numpy()
    y = layer(x, training=training).numpy()
    batch_mode = trainable and training is True
    moved = not np.array_equal(layer.moving_mean.numpy(), np.zeros(3, np.float32))
    assert moved == batch_mode
    if not batch_mode:
        assert np.array_equal(y, inference)
    else:
        np.testing.assert_allclose(y.mean(0), np.zeros(3), atol=1e-5)


def test_predict_does_not_depend_on_batch_composition():
    # PAIN_POINTS 7.
    model = keras.Sequential([keras.Input((3,)), tfbn.BatchNormalization(momentum=0.5)])
    model.compile("sgd", "mse")
    model.fit(_normal((32, 3), mean=2.0), _normal((32, 3)), epochs=1, verbose=0)
    x = _normal((8, 3))
    together = model.predict(x, batch_size=8, verbose=0)
    alone = np.concatenate([model(x[i : i + 1], training=False).numpy() for i in range(8)])
    np.testing.assert_allclose(model.predict(x, batch_size=1, verbose=0), together, rtol=1e-6)
    np.testing.assert_allclose(alone, together, rtol=1e-6)


# --------------------------------------------------------------------------
# Tensor training flags


def test_tensor_flag_in_tf_function_traces_once_and_gates_updates():
    layer = tfbn.BatchNormalization(momentum=0.5)
    layer.build((None, 3))
    x = _normal((16, 3), mean=4.0)
    traces = []

    @tf.function
    def run(inputs, training):
        traces.append(1)
        return layer(inputs, training=training)

    inference = run(x, tf.constant(False)).numpy()
    assert np.array_equal(layer.moving_mean.numpy(), np.zeros(3, np.float32))
    training = run(x, tf.constant(True)).numpy()
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), 0.5 * x.astype(np.float64).mean(0), rtol=1e-6
    )
    assert len(traces) == 1
    np.testing.assert_allclose(training.mean(0), np.zeros(3), atol=1e-5)
    assert not np.allclose(inference, training)


def test_tensor_flag_under_deferred_updates():
    layer = tfbn.BatchNormalization(momentum=0.5)
    x = _normal((16, 3), mean=4.0)

    @tf.function
    def run(training):
        with tfbn.deferred_updates() as updates:
            y = layer(x, training=training)
            updates.apply()
        return y

    run(tf.constant(False))
    assert np.array_equal(layer.moving_mean.numpy(), np.zeros(3, np.float32))
    run(tf.constant(True))
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), 0.5 * x.astype(np.float64).mean(0), rtol=1e-6
    )


def test_five_steps_agree_in_eager_function_and_xla():
    # PAIN_POINTS 25.
    batches = [_normal((8, 4, 4, 3), mean=1.0, std=2.0, seed=s) for s in range(5)]
    results = []
    for wrap in (lambda f: f, tf.function, lambda f: tf.function(f, jit_compile=True)):
        layer = tfbn.BatchNormalization(momentum=0.7)
        step = wrap(lambda x, layer=layer: layer(x, training=True))
        for batch in batches:
            step(tf.constant(batch))
        results.append(layer.get_weights())
    mean, var = _ema_sequence(batches, 0.7, axes=(0, 1, 2))
    for weights in results:
        np.testing.assert_allclose(weights[2], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(weights[3], var, rtol=1e-5)


@pytest.mark.parametrize("offset", [1e4, 1e5, 1e6])
@pytest.mark.parametrize("axis", [-1, 1])
def test_large_offsets_eager_vs_xla(offset, axis):
    # PAIN_POINTS 14.
    shape = (16, 4, 4, 3) if axis == -1 else (16, 3, 4, 4)
    x = tf.constant((offset + _normal(shape, seed=5)).astype(np.float32))
    constant = tf.fill(shape, np.float32(offset))
    outputs = []
    for compile_flag in (False, True):
        layer = tfbn.BatchNormalization(axis=axis, momentum=0.0, beta_initializer="ones")
        call = tf.function(lambda t, layer=layer: layer(t, training=True), jit_compile=compile_flag)
        y = call(x).numpy()
        assert np.all(np.isfinite(y))
        axes = (0, 1, 2) if axis == -1 else (0, 2, 3)
        np.testing.assert_allclose(
            layer.moving_variance.numpy(), x.numpy().astype(np.float64).var(axis=axes), rtol=1e-3
        )
        np.testing.assert_allclose(call(constant).numpy(), np.ones(shape), atol=1e-6)
        assert np.array_equal(layer.moving_variance.numpy(), np.zeros(3, np.float32))
        outputs.append(y)
    # tf.function (oneDNN kernels) and XLA agree.
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------
# Mixed precision


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16", "float16"])
def test_low_precision_statistics_are_float32_and_do_not_overflow(policy):
    x = _normal((32, 8, 8, 4), mean=300.0, std=30.0)
    reference_layer = tfbn.BatchNormalization(momentum=0.5)
    reference_layer(x, training=True)
    layer = tfbn.BatchNormalization(momentum=0.5, dtype=policy)
    compute_dtype = layer.compute_dtype
    y = layer(tf.cast(x, compute_dtype), training=True)
    assert y.dtype == compute_dtype
    assert np.all(np.isfinite(y.numpy().astype(np.float32)))
    assert all(w.dtype == "float32" for w in layer.weights)
    tolerance = 1e-2 if "bfloat16" in policy else 1e-3
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), reference_layer.moving_mean.numpy(), rtol=tolerance
    )
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), reference_layer.moving_variance.numpy(), rtol=5 * tolerance
    )


def test_bfloat16_small_increments_are_not_lost():
    layer = tfbn.BatchNormalization(momentum=0.999, dtype="mixed_bfloat16")
    reference_mean = np.zeros(2)
    for step in range(300):
        x = _normal((16, 2), mean=1.0 + 0.01 * step, seed=step)
        layer(tf.cast(x, tf.bfloat16), training=True)
        reference_mean = 0.999 * reference_mean + 0.001 * tf.cast(
            tf.cast(x, tf.bfloat16), tf.float64
        ).numpy().mean(0)
    np.testing.assert_allclose(layer.moving_mean.numpy(), reference_mean, rtol=1e-3)


# --------------------------------------------------------------------------
# Safe updates and validation


def _assert_unchanged(layer, before):
    for a, b in zip(before, layer.get_weights()):
        assert np.array_equal(a, b)


def test_empty_batch_leaves_statistics_bit_identical():
    layer = tfbn.BatchNormalization()
    layer.build((None, 3))
    _randomize(layer)
    before = layer.get_weights()
    y = layer(tf.zeros([0, 3]), training=True)
    assert y.shape == (0, 3)
    _assert_unchanged(layer, before)


def test_fully_masked_batch_uses_moving_statistics_and_skips_the_update():
    layer = tfbn.BatchNormalization(axis=1)
    x = _normal((4, 3, 5), mean=2.0)
    layer.build(x.shape)
    _randomize(layer)
    before = layer.get_weights()
    y = layer(x, training=True, mask=tf.zeros((4, 3), tf.bool))
    _assert_unchanged(layer, before)
    np.testing.assert_allclose(y.numpy(), layer(x, training=False).numpy(), rtol=1e-5, atol=1e-6)


MASK_CASES = [
    ((6, 3, 3), 1),
    ((6, 4, 3), -1),
    ((5, 4, 3, 2), [1, 3]),
    ((5, 4, 3, 2), [1, 2]),
]


@pytest.mark.parametrize("shape, axis", MASK_CASES)
def test_keras_mask_follows_the_stock_convention_for_every_axis(shape, axis):
    # Keras masks drop the last axis; the stock layer expands them there
    # whatever `axis` is, so the mask may cover a feature axis too.
    x = _normal(shape, mean=3.0, std=2.0, seed=7)
    mask = np.random.default_rng(3).random(shape[:-1]) > 0.4
    mask[..., -1] = False  # The last step is padding, as in a sequence batch.
    layer = tfbn.BatchNormalization(axis=axis, momentum=0.0, epsilon=1e-3)
    y = layer(x, training=True, mask=mask).numpy()
    mean, variance, count = reference.masked_moments(
        x, mask, layer.axis if isinstance(axis, list) else [axis]
    )
    trusted = count >= 2
    assert trusted.any()
    np.testing.assert_allclose(
        layer.moving_mean.numpy().reshape(-1)[trusted],
        mean[trusted],
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        layer.moving_variance.numpy().reshape(-1)[trusted], variance[trusted], rtol=1e-4, atol=1e-5
    )
    # A feature with fewer than two unmasked values keeps its statistics.
    np.testing.assert_array_equal(layer.moving_mean.numpy().reshape(-1)[~trusted], 0.0)
    np.testing.assert_array_equal(layer.moving_variance.numpy().reshape(-1)[~trusted], 1.0)
    feature_shape = reference.broadcast_shape(
        shape, layer.axis if isinstance(axis, list) else [axis]
    )
    expected = (x - mean.reshape(feature_shape)) / np.sqrt(variance.reshape(feature_shape) + 1e-3)
    finite = np.broadcast_to(trusted.reshape(feature_shape), shape)
    np.testing.assert_allclose(y[finite], expected[finite], rtol=1e-4, atol=1e-4)


def test_keras_mask_matches_the_stock_layer_with_axis_1():
    # Input (6, 3, 3), axis=1, the last time step masked: every feature keeps
    # values, so the stock layer is right here and tfbn must agree.
    x = _normal((6, 3, 3), mean=5.0, std=3.0, seed=11)
    mask = np.ones((6, 3), bool)
    mask[:, -1] = False
    ours = tfbn.BatchNormalization(axis=1, momentum=0.0)
    stock = keras.layers.BatchNormalization(axis=1, momentum=0.0)
    y_ours = ours(x, training=True, mask=mask).numpy()
    y_stock = stock(x, training=True, mask=mask).numpy()
    np.testing.assert_allclose(
        ours.moving_mean.numpy()[:2], stock.moving_mean.numpy()[:2], rtol=1e-5
    )
    np.testing.assert_allclose(y_ours[:, :2], y_stock[:, :2], rtol=1e-4, atol=1e-4)
    # Feature 2 has no unmasked value: tfbn keeps its statistics.
    assert ours.moving_mean.numpy()[2] == 0.0 and ours.moving_variance.numpy()[2] == 1.0


def test_mask_of_the_wrong_rank_names_the_convention():
    layer = tfbn.BatchNormalization(axis=1)
    with pytest.raises(ValueError, match="without the last axis"):
        layer(_normal((4, 3, 6)), training=True, mask=np.ones((4, 3, 6), bool))


def test_non_finite_batch_leaves_statistics_bit_identical():
    layer = tfbn.BatchNormalization()
    x = _normal((8, 3))
    x[2, 1] = np.nan
    layer(_normal((8, 3)), training=True)
    before = layer.get_weights()
    layer(x, training=True)
    _assert_unchanged(layer, before)
    x[2, 1] = np.inf
    tf.function(lambda t: layer(t, training=True))(x)
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("shape", [(1, 4), (1, 1, 1, 4)])
def test_one_value_per_feature_in_training_outputs_beta_and_keeps_the_statistics(shape):
    # The stock layer and the formula give beta; no variance, so no update.
    layer = tfbn.BatchNormalization()
    layer.build(shape)
    _randomize(layer)
    before = layer.get_weights()
    with pytest.warns(UserWarning, match=r"one value per feature"):
        y = layer(_normal(shape), training=True).numpy()
    np.testing.assert_allclose(
        y.reshape(-1, 4), np.broadcast_to(layer.beta.numpy(), (1, 4)), atol=1e-6
    )
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_one_value_per_feature_in_a_traced_or_xla_function_matches_eager(jit_compile):
    layer = tfbn.BatchNormalization(momentum=0.5)
    layer.build((None, 4))
    _randomize(layer)
    before = layer.get_weights()
    run = tf.function(lambda t: layer(t, training=True), jit_compile=jit_compile)
    y = run(tf.constant(_normal((1, 4)))).numpy()
    np.testing.assert_allclose(y, layer.beta.numpy()[None], atol=1e-6)
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("run_eagerly", [True, False])
def test_fit_on_a_last_batch_of_one_sample_behaves_the_same_eager_or_traced(run_eagerly):
    # 33 samples with batch_size=32: the last batch has one sample.
    x = _normal((33, 4), mean=1.0, seed=5)
    inputs = keras.Input((4,))
    layer = tfbn.BatchNormalization(momentum=0.5)
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    model.compile("sgd", "mse", run_eagerly=run_eagerly)
    model.fit(x, np.zeros((33, 1), np.float32), batch_size=32, epochs=1, shuffle=False, verbose=0)
    # Only the first batch updated the statistics: 0.5 * init + 0.5 * batch.
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), 0.5 * x[:32].astype(np.float64).mean(0), rtol=1e-5
    )


def test_one_value_per_feature_with_unknown_shape_skips_the_update():
    layer = tfbn.BatchNormalization()
    layer.build((None, 4))
    before = layer.get_weights()
    run = tf.function(lambda t: layer(t, training=True), input_signature=[tf.TensorSpec([None, 4])])
    y = run(tf.constant(_normal((1, 4)))).numpy()
    assert np.all(np.isfinite(y))
    _assert_unchanged(layer, before)


def test_one_sample_with_spatial_extent_is_fine():
    layer = tfbn.BatchNormalization(momentum=0.99)
    x = _normal((1, 4, 4, 2))
    layer(x, training=True)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(),
        0.99 + 0.01 * x.astype(np.float64).var(axis=(0, 1, 2)),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"momentum": 1.5}, ValueError, r"momentum.*\[0, 1\].*1\.5"),
        ({"momentum": float("nan")}, ValueError, "momentum"),
        ({"momentum": -0.1}, ValueError, "momentum"),
        ({"momentum": "fast"}, TypeError, "momentum"),
        ({"epsilon": float("inf")}, ValueError, r"epsilon.*finite"),
        ({"epsilon": float("nan")}, ValueError, "epsilon"),
        ({"epsilon": -1e-3}, ValueError, "epsilon"),
        ({"moving_variance_estimator": "bessel"}, ValueError, "moving_variance_estimator"),
        ({"axis": [1, 1]}, ValueError, "duplicate"),
        ({"axis": 1.5}, TypeError, "axis"),
        ({"renorm": True, "renorm_clipping": {"rmx": 2}}, ValueError, "renorm_clipping"),
        ({"renorm": True, "renorm_momentum": 1.5}, ValueError, "renorm_momentum"),
        ({"virtual_batch_size": 1}, ValueError, "virtual_batch_size"),
        ({"virtual_batch_size": 4, "synchronized": True}, ValueError, "synchronized"),
    ],
)
def test_construction_validates_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        tfbn.BatchNormalization(**kwargs)


def test_momentum_one_freezes_the_statistics_bit_for_bit():
    layer = tfbn.BatchNormalization(momentum=1.0)
    layer.build((8, 3))
    _randomize(layer)
    before = layer.get_weights()
    layer(_normal((8, 3), mean=4.0), training=True)
    _assert_unchanged(layer, before)


def test_epsilon_zero_is_accepted_with_a_warning():
    with pytest.warns(UserWarning, match="epsilon.*divided by zero"):
        layer = tfbn.BatchNormalization(epsilon=0.0)
    x = _normal((16, 3), mean=1.0)
    expected, _, _ = reference.batch_norm_train(x, np.ones(3), np.zeros(3), [-1], 0.0)
    np.testing.assert_allclose(layer(x, training=True).numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name, value, error",
    [
        ("momentum", 5.0, ValueError),
        ("momentum", float("inf"), ValueError),
        ("epsilon", -1.0, ValueError),
        ("epsilon", float("nan"), ValueError),
        ("renorm_momentum", 1.5, ValueError),
        ("momentum", "fast", TypeError),
    ],
)
def test_assignments_after_construction_are_validated(name, value, error):
    layer = tfbn.BatchNormalization()
    with pytest.raises(error, match=name):
        setattr(layer, name, value)


def test_assigned_momentum_is_used_by_the_next_update():
    layer = tfbn.BatchNormalization(momentum=0.99)
    layer.momentum = 0.0
    x = _normal((16, 3), mean=2.0)
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_mean.numpy(), x.astype(np.float64).mean(0), rtol=1e-5)


def test_renorm_clipping_error_keeps_the_stock_phrase():
    with pytest.raises(ValueError, match="Received invalid keys"):
        tfbn.BatchNormalization(renorm=True, renorm_clipping={"rmx": 2.0})


def test_reset_restores_every_statistic_including_renorm_and_count():
    layer = tfbn.BatchNormalization(momentum=None, renorm=True, moving_variance_initializer="ones")
    for seed in range(3):
        layer(_normal((16, 3), mean=3.0, std=2.0, seed=seed), training=True)
    moved = {name: v.numpy().copy() for name, v in layer.moving_statistics.items()}
    assert set(moved) == {
        "moving_mean",
        "moving_variance",
        "moving_stddev",
        "renorm_mean",
        "renorm_stddev",
        "num_batches_tracked",
    }
    layer.reset_moving_statistics()
    fresh = tfbn.BatchNormalization(momentum=None, renorm=True)
    fresh.build((16, 3))
    for name, variable in layer.moving_statistics.items():
        assert not np.array_equal(variable.numpy(), moved[name]), name
        np.testing.assert_array_equal(variable.numpy(), fresh.moving_statistics[name].numpy())
    # After the reset the next batch is averaged as the first one.
    x = _normal((16, 3), mean=-1.0, seed=9)
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_mean.numpy(), x.astype(np.float64).mean(0), rtol=1e-5)


def test_axis_out_of_range_raises_at_build():
    with pytest.raises(ValueError, match="out of range"):
        tfbn.BatchNormalization(axis=3)(np.zeros((2, 3), np.float32))


def test_momentum_zero_is_accepted_and_copies_the_batch():
    x = _normal((8, 2), mean=3.0)
    layer = tfbn.BatchNormalization(momentum=0.0)
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_mean.numpy(), x.astype(np.float64).mean(0), rtol=1e-6)


# --------------------------------------------------------------------------
# Ghost batches


def test_ghost_batches_follow_the_tf_keras_definition():
    x = _normal((8, 3), mean=1.0, std=2.0)
    layer = tfbn.BatchNormalization(virtual_batch_size=4, momentum=0.0, epsilon=1e-3)
    y = layer(x, training=True).numpy()
    ghosts = x.reshape(4, 2, 3)  # ghost batch j holds samples j, j + 2, j + 4, j + 6
    mean = ghosts.astype(np.float64).mean(0, keepdims=True)
    var = ghosts.astype(np.float64).var(0, keepdims=True)
    expected = ((ghosts - mean) / np.sqrt(var + 1e-3)).reshape(8, 3)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean.mean(axis=(0, 1)), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var.mean(axis=(0, 1)), rtol=1e-5)


def test_ghost_batches_do_not_constrain_inference():
    # keras#15790: inference on a batch of 3 with virtual_batch_size=4.
    layer = tfbn.BatchNormalization(virtual_batch_size=4)
    layer(_normal((8, 3)), training=True)
    x = _normal((3, 3))
    together = layer(x, training=False).numpy()
    alone = np.concatenate([layer(x[i : i + 1], training=False).numpy() for i in range(3)])
    np.testing.assert_allclose(together, alone, rtol=1e-6)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        layer(_normal((6, 3)), training=True)


# --------------------------------------------------------------------------
# Synchronized BN on two logical CPU devices


def _replica_batches(strategy, shards):
    return strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(shards[context.replica_id_in_sync_group])
    )


@pytest.mark.parametrize("axis", [-1, 1])
def test_synchronized_equals_single_device_on_the_global_batch(axis, two_cpu_strategy):
    # PAIN_POINTS 19: shards from different distributions.
    shape = (8, 4, 3) if axis == -1 else (8, 3, 4)
    shards = [_normal(shape, mean=0.0, seed=1), _normal(shape, mean=4.0, std=2.0, seed=2)]
    single = tfbn.BatchNormalization(axis=axis, momentum=0.5)
    single_y = single(np.concatenate(shards), training=True).numpy()

    strategy = two_cpu_strategy
    with strategy.scope():
        synced = tfbn.BatchNormalization(axis=axis, momentum=0.5, synchronized=True)
        synced.build((None,) + shape[1:])
    outputs = strategy.run(
        tf.function(lambda x: synced(x, training=True)), args=(_replica_batches(strategy, shards),)
    )
    per_replica = strategy.experimental_local_results(outputs)
    np.testing.assert_allclose(
        np.concatenate([t.numpy() for t in per_replica]), single_y, atol=1e-5
    )
    for variable in (synced.moving_mean, synced.moving_variance):
        values = [v.numpy() for v in strategy.experimental_local_results(variable.value)]
        assert np.array_equal(values[0], values[1])
    np.testing.assert_allclose(
        synced.moving_mean.numpy(), single.moving_mean.numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        synced.moving_variance.numpy(), single.moving_variance.numpy(), rtol=1e-5
    )


def test_local_statistics_without_sync_and_averaged_moving_statistics(two_cpu_strategy):
    shards = [_normal((8, 3), mean=0.0, seed=1), _normal((8, 3), mean=4.0, seed=2)]
    strategy = two_cpu_strategy
    with strategy.scope():
        layer = tfbn.BatchNormalization(momentum=0.5)
        layer.build((None, 3))
    outputs = strategy.run(
        tf.function(lambda x: layer(x, training=True)), args=(_replica_batches(strategy, shards),)
    )
    for shard, y in zip(shards, strategy.experimental_local_results(outputs)):
        expected, _, _ = reference.batch_norm_train(shard, np.ones(3), np.zeros(3), [-1], 1e-3)
        np.testing.assert_allclose(y.numpy(), expected, rtol=1e-4, atol=1e-5)
    local_means = [s.astype(np.float64).mean(0) for s in shards]
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.5 * np.mean(local_means, 0), rtol=1e-5)
    values = [v.numpy() for v in strategy.experimental_local_results(layer.moving_mean.value)]
    assert np.array_equal(values[0], values[1])


def test_synchronized_with_one_empty_replica_stays_finite(two_cpu_strategy):
    # PAIN_POINTS 13: a global batch of 3 split 3 + 0.
    shards = [_normal((3, 2), seed=1), np.zeros((0, 2), np.float32)]
    strategy = two_cpu_strategy
    with strategy.scope():
        layer = tfbn.BatchNormalization(momentum=0.5, synchronized=True)
        layer.build((None, 2))
    strategy.run(
        tf.function(lambda x: layer(x, training=True)), args=(_replica_batches(strategy, shards),)
    )
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), 0.5 * shards[0].astype(np.float64).mean(0), rtol=1e-5
    )
    assert np.all(np.isfinite(layer.moving_variance.numpy()))


# --------------------------------------------------------------------------
# Serialization


def test_config_round_trip_keeps_every_argument():
    layer = tfbn.BatchNormalization(
        axis=[1, 2],
        momentum=None,
        epsilon=1e-5,
        center=False,
        renorm=True,
        renorm_clipping={"rmax": 3.0},
        renorm_momentum=0.9,
        moving_variance_estimator="unbiased",
        virtual_batch_size=4,
        fused=False,
        name="bn",
    )
    config = layer.get_config()
    clone = tfbn.BatchNormalization.from_config(config)
    assert clone.get_config() == config


def test_keras_file_and_saved_model_give_identical_outputs(tmp_path):
    inputs = keras.Input((5, 5, 3))
    hidden = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    hidden = tfbn.BatchNormalization(momentum=None, name="bn")(hidden)
    outputs = tfbn.BatchNormalization(
        axis=[1, 3], moving_variance_estimator="unbiased", name="bn2"
    )(hidden)
    model = keras.Model(inputs, outputs)
    x = _normal((6, 5, 5, 3), mean=2.0)
    model(x, training=True)
    model.get_layer("bn").trainable = False
    expected = model.predict(x, verbose=0)

    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("bn"), tfbn.BatchNormalization)
    assert loaded.get_layer("bn").trainable is False
    assert [w.name for w in loaded.weights] == [w.name for w in model.weights]
    assert np.array_equal(loaded.predict(x, verbose=0), expected)

    export_dir = os.path.join(tmp_path, "saved_model")
    model.export(export_dir)
    restored = tf.saved_model.load(export_dir)
    assert np.array_equal(restored.serve(tf.constant(x)).numpy(), expected)


def test_in_a_tf1_graph_updates_go_to_the_update_ops_collection():
    # PAIN_POINTS 9: a Keras layer in a v1 graph must not drop its updates.
    x = _normal((16, 3), mean=2.0)
    with tf.Graph().as_default() as graph:
        layer = tfbn.BatchNormalization(momentum=0.5)
        y = layer(tf.constant(x), training=True)
        update_ops = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
        assert len(update_ops) == 2
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run([y] + update_ops)
            moving_mean = session.run(layer.moving_mean.value)
    np.testing.assert_allclose(moving_mean, 0.5 * x.astype(np.float64).mean(0), rtol=1e-6)
