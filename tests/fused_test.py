"""The fused-kernel path against the general path and the NumPy reference.

Tolerances: both paths compute float32 statistics of the same data with
different summation orders, so they agree to ~1e-6 relative on outputs and
statistics and ~1e-5 on gradients (which subtract nearly equal sums).
"""

import numpy as np
import pytest
import reference
import tensorflow as tf
from harness import forward_backward

import tfbn
from tfbn.nn import fused

RNG = np.random.default_rng(99)


def _normal(shape, mean=0.0, std=1.0):
    return RNG.normal(mean, std, shape).astype(np.float32)


def _layer(fused_flag, axis=-1, **kwargs):
    layer = tfbn.BatchNormalization(axis=axis, momentum=0.5, fused=fused_flag, **kwargs)
    return layer


def _initialize(layer, shape, channels):
    layer.build(shape)
    rng = np.random.default_rng(3)
    layer.gamma.assign(rng.uniform(0.5, 2.0, channels).astype(np.float32))
    layer.beta.assign(rng.normal(0, 1, channels).astype(np.float32))


CASES = [
    ((64, 6), -1),
    ((8, 5, 4), -1),
    ((8, 4, 5), 1),
    ((4, 5, 5, 3), -1),
    ((4, 3, 5, 5), 1),
    ((2, 3, 4, 4, 3), -1),
    ((2, 3, 3, 4, 4), 1),
]


@pytest.mark.parametrize("shape, axis", CASES)
@pytest.mark.parametrize("jit_compile", [None, True])
def test_fused_and_general_paths_agree_with_numpy(shape, axis, jit_compile):
    x = _normal(shape, mean=1.5, std=2.0)
    dy = _normal(shape)
    channels = shape[axis]
    results = []
    for fused_flag in (True, False):
        layer = _layer(fused_flag, axis=axis)
        _initialize(layer, shape, channels)
        results.append(
            forward_backward(layer, x, dy, jit_compile)
            + [layer.moving_mean.numpy(), layer.moving_variance.numpy()]
        )
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    y_ref, mean_ref, var_ref = reference.batch_norm_train(x, gamma, beta, [axis], 1e-3)
    dx_ref, dgamma_ref, dbeta_ref = reference.batch_norm_train_grad(x, gamma, dy, [axis], 1e-3)
    expected = [y_ref, dx_ref, dgamma_ref, dbeta_ref, 0.5 * mean_ref, 0.5 + 0.5 * var_ref]
    for fused_result, general_result in zip(*results):
        np.testing.assert_allclose(fused_result, general_result, rtol=1e-5, atol=2e-5)
    for fused_result, want in zip(results[0], expected):
        np.testing.assert_allclose(fused_result, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_moving_variance_estimator_is_applied_exactly_on_the_fused_path(estimator):
    # The kernel returns n / (n - 1) * variance; the layer must not store that
    # for "biased" nor apply the correction twice for "unbiased".
    x = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    layer = tfbn.BatchNormalization(momentum=0.0, fused=True, moving_variance_estimator=estimator)
    layer(x, training=True)
    expected = 1.25 if estimator == "biased" else 5.0 / 3.0
    np.testing.assert_allclose(layer.moving_variance.numpy(), [expected], rtol=1e-6)


@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_ill_conditioned_batches_are_shifted_before_the_kernel(offset, jit_compile):
    # Without the shift the oneDNN kernel's variance is 0.6% off at 1e6 and
    # XLA's one-pass variance goes negative at 1e4. (The general path's
    # outputs are limited here by the float32 mean: its ulp at 1e6 is 0.06.)
    x = (offset + _normal((16, 4, 4, 2))).astype(np.float32)
    dy = _normal(x.shape)
    layer = _layer(True)
    _initialize(layer, x.shape, 2)
    y, dx, dgamma, dbeta = forward_backward(layer, x, dy, jit_compile)
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    y_ref, _, var_ref = reference.batch_norm_train(x, gamma, beta, [-1], 1e-3)
    dx_ref, dgamma_ref, dbeta_ref = reference.batch_norm_train_grad(x, gamma, dy, [-1], 1e-3)
    for got, want in zip([y, dx, dgamma, dbeta], [y_ref, dx_ref, dgamma_ref, dbeta_ref]):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.5 + 0.5 * var_ref, rtol=1e-4)


def test_constant_input_has_zero_variance_and_outputs_beta():
    layer = _layer(True, beta_initializer="ones")
    constant = tf.fill([8, 2, 2, 3], 12345.0)
    y = layer(constant, training=True)
    assert np.array_equal(y.numpy(), np.ones((8, 2, 2, 3), np.float32))
    assert np.array_equal(layer.moving_variance.numpy(), np.full(3, 0.5, np.float32))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_empty_batch_on_the_fused_path_leaves_statistics_bit_identical(jit_compile):
    layer = _layer(True)
    layer.build((None, 4, 4, 3))
    layer.moving_mean.assign([1.0, 2.0, 3.0])
    before = [w.copy() for w in layer.get_weights()]
    call = tf.function(lambda t: layer(t, training=True), jit_compile=jit_compile)
    y = call(tf.zeros([0, 4, 4, 3]))
    assert y.shape == (0, 4, 4, 3)
    for old, new in zip(before, layer.get_weights()):
        assert np.array_equal(old, new)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_fused_matches_the_float32_general_path(policy):
    x = _normal((16, 4, 4, 3), mean=3.0, std=2.0)
    low = tfbn.BatchNormalization(momentum=0.5, fused=True, dtype=policy)
    y = low(tf.cast(x, low.compute_dtype), training=True)
    assert y.dtype == low.compute_dtype
    assert all(w.dtype == "float32" for w in low.weights)
    full = _layer(False)
    full(tf.cast(tf.cast(x, low.compute_dtype), tf.float32), training=True)
    tolerance = 2e-2 if "bfloat16" in policy else 2e-3
    np.testing.assert_allclose(low.moving_mean.numpy(), full.moving_mean.numpy(), rtol=tolerance)
    np.testing.assert_allclose(
        low.moving_variance.numpy(), full.moving_variance.numpy(), rtol=tolerance
    )
    inference = low(tf.cast(x, low.compute_dtype), training=False)
    assert inference.dtype == low.compute_dtype


def test_tensor_training_flag_and_deferred_updates_on_the_fused_path():
    layer = _layer(True)
    x = _normal((8, 3, 3, 2), mean=2.0)
    layer.build(x.shape)

    @tf.function
    def run(training):
        with tfbn.deferred_updates() as updates:
            y = layer(x, training=training)
            assert updates.paths == [layer.path]
            updates.apply()
        return y

    run(tf.constant(False))
    assert np.array_equal(layer.moving_mean.numpy(), np.zeros(2, np.float32))
    run(tf.constant(True))
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), 0.5 * x.astype(np.float64).mean((0, 1, 2)), rtol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"renorm": True}, "renorm=True"),
        ({"virtual_batch_size": 2}, "virtual_batch_size=2"),
        ({"axis": [1, 3]}, "several axes"),
        ({"synchronized": True}, "synchronized=True"),
    ],
)
def test_fused_true_is_refused_at_construction_for_settings_that_never_fuse(kwargs, reason):
    # tf-keras refused these when the layer was created, not at first call.
    with pytest.raises(ValueError, match=reason):
        tfbn.BatchNormalization(fused=True, **kwargs)
    auto = tfbn.BatchNormalization(fused=None, **kwargs)
    assert np.all(np.isfinite(auto(_normal((4, 3, 3, 2)), training=True).numpy()))


@pytest.mark.parametrize(
    "kwargs, call_kwargs, reason",
    [
        ({"axis": 2}, {}, "neither the last axis nor axis 1"),
        ({}, {"mask": np.ones((4, 3, 3), bool)}, "a mask was passed"),
        ({"dtype": "float64"}, {}, "float64"),
    ],
)
def test_fused_true_names_what_the_call_prevents_in_training_only(kwargs, call_kwargs, reason):
    layer = tfbn.BatchNormalization(fused=True, **kwargs)
    with pytest.raises(ValueError, match=reason):
        layer(_normal((4, 3, 3, 2)), training=True, **call_kwargs)
    # Inference runs no kernel, so nothing there can prevent it.
    x = _normal((4, 3, 3, 2))
    expected = tfbn.BatchNormalization(fused=False, **kwargs)(x, training=False)
    y = layer(x, training=False, **call_kwargs)
    np.testing.assert_array_equal(y.numpy(), expected.numpy())


def test_fused_must_be_a_bool_or_none():
    with pytest.raises(TypeError, match="fused"):
        tfbn.BatchNormalization(fused="yes")


def test_layout_maps_ranks_and_axes_to_kernel_formats():
    assert fused.layout(4, 3) == ("NHWC", None)
    assert fused.layout(4, 1) == ("NCHW", None)
    assert fused.layout(5, 4) == ("NDHWC", None)
    assert fused.layout(5, 1) == ("NCDHW", None)
    assert fused.layout(2, 1) == ("NHWC", 1)
    assert fused.layout(4, 2) is None
    x = tf.zeros([5, 7])
    assert fused.to_kernel_rank(x, 1).shape == (5, 1, 1, 7)
    assert fused.to_kernel_rank(tf.zeros([5, 7, 3]), 3).shape == (5, 7, 3, 1)


def _raw_forward_backward(x, scale, offset, dy):
    """y, dx, dscale, doffset of the bare kernels on `x` (NHWC, training)."""
    empty = tf.zeros([0])
    forward = tf.raw_ops.FusedBatchNormV3(
        x=x,
        scale=scale,
        offset=offset,
        mean=empty,
        variance=empty,
        epsilon=1e-3,
        exponential_avg_factor=1.0,
        data_format="NHWC",
        is_training=True,
    )
    dx, dscale, doffset = tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=dy,
        x=x,
        scale=scale,
        reserve_space_1=forward.reserve_space_1,
        reserve_space_2=forward.reserve_space_2,
        reserve_space_3=forward.reserve_space_3,
        epsilon=1e-3,
        data_format="NHWC",
        is_training=True,
    )[:3]
    return [forward.y, dx, dscale, doffset]


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_fused_path_is_the_bare_kernels_on_the_input_or_the_shifted_input(offset):
    # Well-conditioned data reaches the kernels as is; ill-conditioned data
    # minus its first sample per channel, in the forward and the backward.
    x = tf.constant(offset + _normal((8, 3, 3, 2)))
    dy = tf.constant(_normal((8, 3, 3, 2)))
    scale = tf.constant([0.5, 2.0])
    beta = tf.constant([1.0, -1.0])

    @tf.function
    def tfbn_path(x, scale, beta):
        with tf.GradientTape() as tape:
            tape.watch([x, scale, beta])
            y = fused.batch_norm_training(x, scale, beta, 1e-3, "NHWC")[0]
        return [y, *tape.gradient(y, [x, scale, beta], output_gradients=dy)]

    kernel_input = x - x[:1, :1, :1, :] if offset else x
    got = tfbn_path(x, scale, beta)
    want = _raw_forward_backward(kernel_input, scale, beta, dy)
    for got_value, want_value in zip(got, want):
        assert np.array_equal(got_value.numpy(), want_value.numpy())


def test_forward_and_backward_share_one_conditional():
    # The guard's conditional also returns the kernel's input, so the
    # gradient needs no conditional of its own.
    x = tf.constant(_normal((4, 3, 3, 2)))
    scale, beta = tf.ones([2]), tf.zeros([2])

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fused.batch_norm_training(x, scale, beta, 1e-3, "NHWC")[0]
        return tape.gradient(y, x)

    operations = step.get_concrete_function(x).graph.get_operations()
    assert sum(op.type in ("If", "StatelessIf") for op in operations) == 1
