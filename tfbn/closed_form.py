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

from typing import Callable, Optional, Sequence, Tuple

import tensorflow as tf

from tfbn import moments as moments_lib

# (mean, variance) -> (r, d): Batch Renormalization's correction, treated as
# a constant by the gradient, as in the paper.
Correction = Callable[[tf.Tensor, tf.Tensor], Tuple[tf.Tensor, tf.Tensor]]


def batch_normalize(
    x: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    reduction_axes: Sequence[int],
    epsilon: float,
    fallback_mean: tf.Tensor,
    fallback_variance: tf.Tensor,
    mask: Optional[tf.Tensor] = None,
    synchronized: bool = False,
    correction: Optional[Correction] = None,
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
        axis
        for axis in range(x.shape.rank)
        if axis not in axes and gamma.shape[axis] == 1
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
