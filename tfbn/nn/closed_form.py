"""Batch normalization with a closed-form backward, for every configuration.

Autodiff through the statistics (`tf.nn.moments` or `batch_moments`) runs
the backward of each small op of the forward: about twenty full-tensor
passes. The gradient of batch normalization has a closed form (Ioffe &
Szegedy, 2015) that needs two per-channel sums and one elementwise pass:

    dx = A * dy + w * (B * (x - mean) + C)      (A, B, C per channel)

with, writing x_hat = (x - mean) / s, s = sqrt(variance + epsilon), W the
(weighted) count, g' = gamma * r the effective scale and w the mask weights,

    A = g' / s,   B = -A * sum(dy * x_hat) / (s * W),   C = -A * sum(dy) / W.

The sums run over every value (masked ones too: their outputs depend on the
statistics); only the values that entered the statistics carry the `w` term.
`(x - mean)` rather than `x` keeps B * x from cancelling against C for data
far from zero. Under a synchronized strategy the statistics are global, so
the two sums are all-reduced for dx, while dgamma and dbeta stay local like
any other per-replica gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import tensorflow as tf

from tfbn.nn import moments as moments_lib
from tfbn.nn import renorm as renorm_lib

# (mean, variance) -> (r, d): Batch Renormalization's correction, treated as
# a constant by the gradient, as in the paper.
Correction = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def batch_normalize(
    x: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    reduction_axes: Sequence[int],
    epsilon: float,
    fallback_mean: tf.Tensor,
    fallback_variance: tf.Tensor,
    mask: tf.Tensor | None = None,
    synchronized: bool = False,
    correction: Correction | None = None,
):
    """Normalizes `x` with its batch statistics; the backward is closed-form.

    Args:
        x: float32 input.
        gamma, beta: float32 scale and offset, shaped to broadcast against `x`
            (size 1 on every axis that is not a feature axis).
        reduction_axes: Non-negative axes the statistics reduce over.
        epsilon: Added to the variance.
        fallback_mean, fallback_variance: Broadcastable statistics used where a
            batch has no values (empty or fully masked), so the output stays
            finite; usually the moving statistics.
        mask: Optional float weights broadcastable to `x` (see
            `tfbn.moments.batch_moments`).
        synchronized: Global statistics under a multi-replica strategy.
        correction: Optional Batch Renormalization correction `(r, d)`; the
            output is then `gamma * (r * x_hat + d) + beta`.

    Returns:
        `(outputs, moments)`: the normalized float32 tensor and the
        `tfbn.moments.BatchMoments` of the batch (not differentiable).
    """
    axes = sorted(int(axis) for axis in reduction_axes)
    context = moments_lib.replica_context() if synchronized else None
    # Axes kept in the statistics but broadcast in gamma (the ghost-batch
    # axis): dgamma and dbeta are summed over them as well.
    param_axes = [
        axis for axis in range(x.shape.rank) if axis not in axes and gamma.shape[axis] == 1
    ]

    # The statistics are computed outside the custom gradient, from a
    # stop-gradient input so autodiff records nothing for them: the
    # closed-form dx below accounts for their dependence on x. Keeping them
    # (and the renorm correction) out of the custom gradient's IdentityN also
    # matters for correctness: when the moving-statistics update consumed an
    # IdentityN output, Grappler's dependency optimizer (TF 2.21, under a
    # GradientTape in a tf.function) dropped the order between the
    # forward's read of the renorm statistics and their update.
    stats = moments_lib.batch_moments(
        tf.stop_gradient(x), axes, mask=mask, synchronized=synchronized
    )
    has_values = stats.count > 0
    mean = tf.where(has_values, stats.mean, fallback_mean)
    variance = tf.where(has_values, stats.variance, fallback_variance)
    inv_stddev = tf.math.rsqrt(variance + epsilon)
    if correction is None:
        r, d = tf.ones_like(mean), tf.zeros_like(mean)
    else:
        r, d = correction(mean, variance)

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        scale = gamma * r * inv_stddev
        outputs = (x - mean) * scale + (beta + d * gamma)

        def grad(dy):
            centred = x - mean
            sum_dy = moments_lib.sum_over_axes(dy, axes)
            sum_dy_x_hat = moments_lib.sum_over_axes(dy * centred, axes) * inv_stddev
            dgamma = tf.reduce_sum(r * sum_dy_x_hat + d * sum_dy, param_axes, keepdims=True)
            dbeta = tf.reduce_sum(sum_dy, param_axes, keepdims=True)
            if context is not None:
                sum_dy, sum_dy_x_hat = context.all_reduce(
                    tf.distribute.ReduceOp.SUM, [sum_dy, sum_dy_x_hat]
                )
            # Zero where the batch has no values: then the statistics are
            # the fallback constants and do not depend on x.
            per_value = tf.math.divide_no_nan(scale, stats.count)
            coefficient_b = -per_value * sum_dy_x_hat * inv_stddev
            coefficient_c = -per_value * sum_dy
            through_statistics = centred * coefficient_b + coefficient_c
            if mask is not None:
                through_statistics = through_statistics * mask
            dx = dy * scale + through_statistics
            return dx, dgamma, dbeta

        return outputs, grad

    return normalize(x, gamma, beta), stats


def normalize_features(
    x: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    moving_mean: tf.Tensor,
    moving_variance: tf.Tensor,
    feature_axes: Sequence[int],
    epsilon: float,
    *,
    mask: tf.Tensor | None = None,
    virtual_batch_size: int | None = None,
    synchronized: bool = False,
    renorm_statistics: tuple[tf.Tensor, tf.Tensor] | None = None,
    renorm_clipping: dict | None = None,
    adjustment: Callable | None = None,
):
    """The general path for parameter-shaped weights, as layers hold them.

    Wraps `batch_normalize` with what the Keras layer and `tfbn.compat.v1`
    both need: broadcasting the weights, ghost batches, the renorm
    correction, and tf.layers' `adjustment`.

    Args:
        x: float32 input.
        gamma, beta, moving_mean, moving_variance: float32, one value per
            feature (the feature axes' sizes, in sorted axis order). The
            moving statistics normalize a batch with no values.
        feature_axes: Sorted non-negative feature axes of `x`.
        epsilon: Added to the variance.
        mask: Optional weights broadcastable against `x`: a bool mask, or
            float weights (which may be any non-negative values).
        virtual_batch_size: Ghost-batch size, tf-keras' definition: `[N, ...]`
            is viewed as `[virtual_batch_size, N // virtual_batch_size, ...]`
            and axis 1 is kept, so ghost batch `j` holds samples `j, j + G, ...`.
        synchronized: Global statistics under a multi-replica strategy.
        renorm_statistics: `(renorm_mean, renorm_stddev)`, one value per
            feature, to apply Batch Renormalization; None for plain BN.
        renorm_clipping: The validated clipping dict used with renorm.
        adjustment: tf.layers' `adjustment(shape) -> (scale, bias)`, applied
            to the normalized value (`gamma * (scale * x_hat + bias) + beta`)
            and called with the shape of the (ghost-batch view of the) input.

    Returns:
        `(outputs, mean, variance, count, values)`: the output shaped like
        `x`; then in the parameter shape the batch mean and biased variance
        (averaged over ghost batches), the number of values (sum of weights)
        and the number of values with a positive weight, per feature (the
        fewest of any ghost batch).
    """
    param_shape = gamma.shape
    ghost = virtual_batch_size
    # A boolean mask (Keras') counts its values in `count` already; only
    # real-valued weights need the positive-weight count below.
    binary_mask = mask is not None and mask.dtype == tf.bool
    if binary_mask:
        mask = tf.cast(mask, tf.float32)
    data = x
    offset = 0
    if ghost is not None:

        def ghost_view(tensor):
            shape = tf.shape(tensor)
            return tf.reshape(tensor, tf.concat([[ghost, shape[0] // ghost], shape[1:]], 0))

        data = ghost_view(x)
        mask = None if mask is None else ghost_view(mask)
        offset = 1
    rank = data.shape.rank
    axes = [axis + offset for axis in feature_axes]
    kept = set(axes) | ({1} if ghost is not None else set())
    reduction_axes = [axis for axis in range(rank) if axis not in kept]

    def broadcast(value):
        shape = [1] * rank
        for axis, size in zip(axes, param_shape):
            shape[axis] = size
        return tf.reshape(value, shape)

    correction = None
    if renorm_statistics is not None:
        renorm_mean, renorm_stddev = (broadcast(value) for value in renorm_statistics)
        correction = functools.partial(
            renorm_lib.correction,
            renorm_mean=renorm_mean,
            renorm_stddev=renorm_stddev,
            epsilon=epsilon,
            clipping=renorm_clipping,
        )

    def normalize(scale, offset):
        # A batch with no values (empty, or fully masked) normalizes with the
        # moving statistics rather than dividing by sqrt(epsilon).
        return batch_normalize(
            data,
            scale,
            offset,
            reduction_axes,
            epsilon,
            fallback_mean=broadcast(moving_mean),
            fallback_variance=broadcast(moving_variance),
            mask=mask,
            synchronized=synchronized,
            correction=correction,
        )

    gamma, beta = broadcast(gamma), broadcast(beta)
    if adjustment is None:
        outputs, stats = normalize(gamma, beta)
    else:
        # The adjustment may vary over any axis, so it is applied outside
        # the per-feature affine terms that `batch_normalize` differentiates.
        adjust_scale, adjust_bias = (tf.cast(t, tf.float32) for t in adjustment(tf.shape(data)))
        normalized, stats = normalize(tf.ones_like(gamma), tf.zeros_like(beta))
        outputs = (normalized * adjust_scale + adjust_bias) * gamma + beta
    mean, variance = stats.mean, stats.variance
    count = tf.broadcast_to(stats.count, tf.shape(mean))
    if mask is None or binary_mask:
        values = count
    else:
        # Weights need not be 0 or 1 (TF1's batch_weights): what makes
        # statistics trustworthy is how many values have a positive weight.
        positive = tf.cast(tf.broadcast_to(mask > 0, tf.shape(data)), tf.float32)
        values = moments_lib.sum_over_axes(positive, reduction_axes)
        context = moments_lib.replica_context() if synchronized else None
        if context is not None:
            values = context.all_reduce(tf.distribute.ReduceOp.SUM, values)
    if ghost is not None:
        outputs = tf.reshape(outputs, tf.shape(x))
        mean = tf.reduce_mean(mean, axis=1, keepdims=True)
        variance = tf.reduce_mean(variance, axis=1, keepdims=True)
        count = tf.reduce_min(count, axis=1, keepdims=True)
        values = tf.reduce_min(values, axis=1, keepdims=True)
    return outputs, *(tf.reshape(t, param_shape) for t in (mean, variance, count, values))
