"""The closed-form backward against autodiff of the plain formula in float64.

The reference differentiates `gamma * (r * x_hat + d) + beta` written
directly with weighted float64 statistics, so it shares no code with
`tfbn.closed_form`.
"""

import numpy as np
import pytest
import tensorflow as tf
from harness import forward_backward

import tfbn

RNG = np.random.default_rng(2024)


def _normal(shape, mean=0.0, std=1.0):
    return RNG.normal(mean, std, shape).astype(np.float32)


def _reference(x, gamma, beta, dy, axes, epsilon, weights=None, r=None, d=None):
    """(y, dx, dgamma, dbeta) by float64 autodiff; gamma/beta broadcastable."""
    x, gamma, beta, dy = (tf.constant(np.asarray(v, np.float64)) for v in (x, gamma, beta, dy))
    weights = tf.ones_like(x) if weights is None else tf.constant(np.asarray(weights, np.float64))
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        weights = tf.broadcast_to(weights, tf.shape(x))
        count = tf.reduce_sum(weights, axes, keepdims=True)
        mean = tf.reduce_sum(x * weights, axes, keepdims=True) / count
        variance = tf.reduce_sum((x - mean) ** 2 * weights, axes, keepdims=True) / count
        x_hat = (x - mean) / tf.sqrt(variance + epsilon)
        if r is not None:
            x_hat = x_hat * r + d
        y = gamma * x_hat + beta
    grads = tape.gradient(y, [x, gamma, beta], output_gradients=dy)
    return [y.numpy()] + [g.numpy() for g in grads]


def _random_affine(layer, shape):
    layer.build(shape)
    rng = np.random.default_rng(5)
    layer.gamma.assign(rng.uniform(0.5, 2.0, layer.gamma.shape).astype(np.float32))
    layer.beta.assign(rng.normal(0, 1, layer.beta.shape).astype(np.float32))
    return layer.gamma.numpy(), layer.beta.numpy()


def _assert_close(got, want):
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, np.reshape(w, g.shape), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_multi_axis_matches_float64_autodiff(jit_compile):
    shape = (4, 5, 6, 3)
    x, dy = _normal(shape, mean=2.0, std=3.0), _normal(shape)
    layer = tfbn.BatchNormalization(axis=[1, 3], fused=False)
    gamma, beta = _random_affine(layer, shape)
    got = forward_backward(layer, x, dy, jit_compile)
    want = _reference(x, gamma.reshape(1, 5, 1, 3), beta.reshape(1, 5, 1, 3), dy, (0, 2), 1e-3)
    _assert_close(got, want)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_mask_matches_weighted_float64_autodiff(jit_compile):
    shape = (6, 5, 3)
    x, dy = _normal(shape, mean=-1.0, std=2.0), _normal(shape)
    mask = RNG.uniform(size=(6, 5)) > 0.4
    layer = tfbn.BatchNormalization(fused=False)
    gamma, beta = _random_affine(layer, shape)
    got = forward_backward(layer, x, dy, jit_compile, mask=tf.constant(mask))
    want = _reference(x, gamma, beta, dy, (0, 1), 1e-3, weights=mask[..., None])
    _assert_close(got, want)


def test_fully_masked_batch_gradient_is_the_inference_gradient():
    x, dy = _normal((4, 3)), _normal((4, 3))
    layer = tfbn.BatchNormalization(fused=False)
    gamma, _ = _random_affine(layer, (4, 3))
    _, dx, _, _ = forward_backward(layer, x, dy, False, mask=tf.zeros([4], tf.bool))
    np.testing.assert_allclose(dx, dy * gamma / np.sqrt(1.0 + 1e-3), rtol=1e-6)


def test_ghost_batches_match_per_ghost_float64_autodiff():
    shape, ghost = (8, 3, 2), 2
    x, dy = _normal(shape, mean=1.0, std=2.0), _normal(shape)
    layer = tfbn.BatchNormalization(virtual_batch_size=ghost)
    gamma, beta = _random_affine(layer, shape)
    got = forward_backward(layer, x, dy, False)
    # tf-keras' view: [ghost, N // ghost, ...], statistics over axes 0 and 2.
    view = (ghost, shape[0] // ghost) + shape[1:]
    y, dx, dgamma, dbeta = _reference(x.reshape(view), gamma, beta, dy.reshape(view), (0, 2), 1e-3)
    _assert_close(got, [y.reshape(shape), dx.reshape(shape), dgamma, dbeta])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_renorm_treats_r_and_d_as_constants(seed):
    # Also a regression test: with r and d computed inside the custom
    # gradient, Grappler let the renorm update run before the forward read
    # the renorm statistics (tf.function + GradientTape, most seeds).
    rng = np.random.default_rng(seed)
    shape = (16, 3)
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    dy = rng.normal(0.0, 1.0, shape).astype(np.float32)
    layer = tfbn.BatchNormalization(renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5})
    gamma, beta = _random_affine(layer, shape)
    layer.renorm_mean.assign([0.5, -0.5, 1.0])
    layer.renorm_stddev.assign([2.0, 4.0, 1.0])
    mean, var = x.astype(np.float64).mean(0), x.astype(np.float64).var(0)
    r = np.clip(np.sqrt(var + 1e-3) / layer.renorm_stddev.numpy(), None, 1.5)
    d = np.clip((mean - layer.renorm_mean.numpy()) / layer.renorm_stddev.numpy(), -0.5, 0.5)
    got = forward_backward(layer, x, dy, False)
    _assert_close(got, _reference(x, gamma, beta, dy, (0,), 1e-3, r=r, d=d))


@pytest.mark.parametrize("axis", [-1, 1])
def test_synchronized_gradients_equal_single_device_gradients(axis, two_cpu_strategy):
    shape = (6, 4, 3) if axis == -1 else (6, 3, 4)
    shards = [_normal(shape, mean=0.0), _normal(shape, mean=3.0, std=2.0)]
    dys = [_normal(shape), _normal(shape)]
    single = tfbn.BatchNormalization(axis=axis, fused=False)
    gamma, beta = _random_affine(single, (None,) + shape[1:])
    want = forward_backward(single, np.concatenate(shards), np.concatenate(dys), False)

    strategy = two_cpu_strategy
    with strategy.scope():
        synced = tfbn.BatchNormalization(axis=axis, synchronized=True)
        synced.build((None,) + shape[1:])
    synced.gamma.assign(gamma)
    synced.beta.assign(beta)

    @tf.function
    def replica_step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = synced(x, training=True)
        return [y] + tape.gradient(y, [x, synced.gamma, synced.beta], output_gradients=dy)

    def per_replica(values):
        return strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(values[context.replica_id_in_sync_group])
        )

    results = strategy.run(replica_step, args=(per_replica(shards), per_replica(dys)))
    y, dx, dgamma, dbeta = (
        [t.numpy() for t in strategy.experimental_local_results(value)] for value in results
    )
    np.testing.assert_allclose(np.concatenate(y), want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(dx), want[1], rtol=1e-4, atol=1e-5)
    # Each replica holds its local share; the optimizer sums them.
    np.testing.assert_allclose(dgamma[0] + dgamma[1], want[2], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dbeta[0] + dbeta[1], want[3], rtol=1e-4, atol=1e-5)
