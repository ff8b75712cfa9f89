"""The fused-kernel fast path: `FusedBatchNormV3` with tfbn's semantics.

One kernel call normalizes a batch and returns its per-channel statistics,
and one gradient kernel computes dx, dgamma and dbeta: about a quarter of the
memory traffic of a composition of small ops (see BENCHMARKS.md). The kernel
has three quirks that this module hides from the layer:

* Its batch variance is Bessel-corrected (`n / (n - 1)`); tfbn normalizes
  and reports with the biased variance, so it is converted back here.
* Its statistics lose precision for data far from zero relative to its
  spread (the oneDNN kernel is 0.6% off at an offset of 1e6; XLA's lowering
  is a one-pass `E[x^2] - E[x]^2` that goes negative at 1e4). When the
  returned mean and variance show such data, the batch is normalized again
  after subtracting one sample per channel, which makes the statistics as
  accurate as `tfbn.moments.batch_moments` (exact 0 for a constant input).
  Well-conditioned data (|mean| <= 10 standard deviations) pays nothing.
* It accepts ranks 4 and 5 only; `(N, C)` and `(N, L, C)` inputs are viewed
  as rank 4 by a free reshape.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from tfbn.nn import moments as moments_lib

# Input dtypes the kernel takes with float32 scale, offset and statistics.
SUPPORTED_DTYPES = (tf.float32, tf.float16, tf.bfloat16)
# mean^2 > this * variance marks data too far from zero for the kernel's
# statistics (XLA's one-pass variance then has a relative error of ~1e-5).
_ILL_CONDITIONED_RATIO = 100.0


def layout(rank: int, feature_axis: int) -> tuple[str, int | None] | None:
    """How an input of `rank` with one feature axis reaches the kernel.

    Args:
        rank: Input rank.
        feature_axis: The non-negative feature axis.

    Returns:
        `(data_format, expand_axis)`: the kernel's data format and, for rank 2
        and 3, where a size-1 axis is inserted to make the input rank 4 (None
        for ranks 4 and 5). None when the kernel cannot take the input.
    """
    last = feature_axis == rank - 1
    if rank in (4, 5) and (last or feature_axis == 1):
        channels_last = {4: "NHWC", 5: "NDHWC"}
        channels_first = {4: "NCHW", 5: "NCDHW"}
        return (channels_last if last else channels_first)[rank], None
    if rank == 2 and last:
        return "NHWC", 1  # (N, C) -> (N, 1, C) -> (N, 1, 1, C) below.
    if rank == 3 and last:
        return "NHWC", 1  # (N, L, C) -> (N, 1, L, C)
    if rank == 3 and feature_axis == 1:
        return "NCHW", 3  # (N, C, L) -> (N, C, L, 1)
    return None


def to_kernel_rank(x: tf.Tensor, expand_axis: int | None) -> tf.Tensor:
    """Inserts the size-1 axes that make `x` rank 4 (a free reshape)."""
    if expand_axis is None:
        return x
    x = tf.expand_dims(x, expand_axis)
    if x.shape.rank == 3:
        x = tf.expand_dims(x, expand_axis)
    return x


def _channel_axis(data_format: str, rank: int) -> int:
    return rank - 1 if data_format.endswith("C") else 1


def _reduction_axes(data_format: str, rank: int) -> Sequence[int]:
    channel = _channel_axis(data_format, rank)
    return [axis for axis in range(rank) if axis != channel]


def _broadcast_channels(values: tf.Tensor, data_format: str, rank: int) -> tf.Tensor:
    shape = [1] * rank
    shape[_channel_axis(data_format, rank)] = -1
    return tf.reshape(values, shape)


def _run_kernel(x, scale, offset, epsilon, data_format):
    empty = tf.zeros([0], tf.float32)
    return tf.raw_ops.FusedBatchNormV3(
        x=x,
        scale=scale,
        offset=offset,
        mean=empty,
        variance=empty,
        epsilon=epsilon,
        exponential_avg_factor=1.0,
        data_format=data_format,
        is_training=True,
    )


def _ill_conditioned(mean: tf.Tensor, variance: tf.Tensor) -> tf.Tensor:
    # Written so that NaN (an empty batch) and negative variances count too.
    return tf.logical_not(tf.reduce_all(mean * mean <= _ILL_CONDITIONED_RATIO * variance))


def batch_norm_training(
    x: tf.Tensor, scale: tf.Tensor, offset: tf.Tensor, epsilon: float, data_format: str
):
    """Normalizes with batch statistics through the fused kernels.

    Args:
        x: Rank 4 or 5 input, float32, float16 or bfloat16.
        scale: float32 per-channel gamma.
        offset: float32 per-channel beta.
        epsilon: Added to the variance.
        data_format: The kernel's data format (`"NHWC"`, `"NCHW"`, ...).

    Returns:
        `(outputs, mean, variance, count)`: outputs in the dtype of `x`; the
        float32 batch mean and *biased* variance per channel (not
        differentiable); the float32 number of values per channel. Gradients
        flow to `x`, `scale` and `offset` through the fused gradient kernel.
    """
    rank = x.shape.rank
    axes = _reduction_axes(data_format, rank)

    @tf.custom_gradient
    def normalize(x, scale, offset):
        fast = _run_kernel(x, scale, offset, epsilon, data_format)
        needs_shift = _ill_conditioned(fast.batch_mean, fast.batch_variance)

        def shifted():
            # Only ill-conditioned batches pay for the shift and its pass.
            shift = tf.reshape(moments_lib.first_sample(x, axes), [-1])
            shifted_x = x - _broadcast_channels(shift, data_format, rank)
            out = _run_kernel(shifted_x, scale, offset, epsilon, data_format)
            mean = out.batch_mean + tf.cast(shift, tf.float32)
            return (out.y, mean, *out[2:], shifted_x)

        def unshifted():
            return (*fast, x)

        # The gradient kernel must see the input its forward kernel saw, so
        # the one conditional also returns that input (x itself, not a copy,
        # on the fast path) and the backward needs no conditional of its own.
        y, mean, variance, *reserve, kernel_input = tf.cond(needs_shift, shifted, unshifted)

        def grad(dy, *unused_statistics_grads):
            dx, dscale, doffset = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy,
                x=kernel_input,
                scale=scale,
                reserve_space_1=reserve[0],
                reserve_space_2=reserve[1],
                reserve_space_3=reserve[2],
                epsilon=epsilon,
                data_format=data_format,
                is_training=True,
            )[:3]
            return dx, dscale, doffset

        return (y, mean, variance), grad

    y, mean, unbiased_variance = normalize(x, scale, offset)
    channels = tf.shape(x)[_channel_axis(data_format, rank)]
    count = tf.cast(tf.size(x) // tf.maximum(channels, 1), tf.float32)
    variance = unbiased_variance * tf.math.divide_no_nan(count - 1.0, count)
    return y, tf.stop_gradient(mean), tf.stop_gradient(variance), count
