"""Batch normalization as functions: training, inference and the update rule.

This module is the one home of every BN rule that `tfbn.BatchNormalization`
and `tfbn.compat.v1` share; both are thin wiring around it (variables,
collections, Keras call conventions):

* `training` normalizes with batch statistics, through the fused kernel
  (`tfbn.nn.fused`) or the closed-form path (`tfbn.nn.closed_form`), and
  returns the `BatchStatistics` an update needs, including whether each
  feature's statistics can be trusted (`MIN_VALUES_PER_FEATURE` values with
  positive weight, finite mean and variance);
* `inference` is `y = x * a + b` with `a = gamma / sqrt(moving_variance +
  epsilon)` and `b = beta - moving_mean * a`;
* `normalize` picks one of the two from a Python or tensor training flag;
* `updated_statistics` folds a batch into the moving statistics (variance
  convention, exponential or cumulative average, renorm), leaving every
  untrusted feature bit-identical;
* `fused_blocker` says why the fused kernel cannot run a configuration.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import tensorflow as tf

from tfbn.nn import closed_form, fused, moments, moving_averages
from tfbn.nn import renorm as renorm_lib

# Every statistic a BN layer may keep, in the order updates are built:
# Keras 3 / tf-keras names, the renorm ones only with renorm, the count only
# for a cumulative average (momentum None).
STATISTIC_NAMES = (
    "moving_mean",
    "moving_variance",
    "moving_stddev",
    "renorm_mean",
    "renorm_stddev",
    "num_batches_tracked",
)
# A feature's batch statistics update the moving ones only if they come from
# at least this many values: one value has a variance of 0 (biased) or an
# undefined one (unbiased), which says nothing about the population.
MIN_VALUES_PER_FEATURE = 2


@dataclasses.dataclass(frozen=True)
class MovingStatistics:
    """The moving statistics of one BN layer, as tensors (or variables' values).

    The renorm fields are None without renorm, `num_batches_tracked` (int64)
    is None unless the layer keeps a cumulative average.
    """

    moving_mean: tf.Tensor
    moving_variance: tf.Tensor
    moving_stddev: tf.Tensor | None = None
    renorm_mean: tf.Tensor | None = None
    renorm_stddev: tf.Tensor | None = None
    num_batches_tracked: tf.Tensor | None = None

    def items(self) -> list[tuple[str, tf.Tensor]]:
        """`(name, value)` of every statistic present, in `STATISTIC_NAMES` order."""
        values = ((name, getattr(self, name)) for name in STATISTIC_NAMES)
        return [(name, value) for name, value in values if value is not None]


@dataclasses.dataclass(frozen=True)
class BatchStatistics:
    """What one training-mode batch contributes to the moving statistics.

    Every field has the parameter shape (one value per feature).

    Attributes:
        mean: float32 batch mean (the mean over ghost batches with ghost BN).
        variance: float32 biased batch variance (likewise).
        count: float32 number of values (sum of weights) per feature, the `n`
            of the Bessel correction (per ghost batch with ghost BN).
        valid: bool, whether the feature's statistics may update the moving
            ones (see `trusted`).
    """

    mean: tf.Tensor
    variance: tf.Tensor
    count: tf.Tensor
    valid: tf.Tensor


@dataclasses.dataclass(frozen=True)
class UpdateRule:
    """How batch statistics are folded into the moving statistics.

    Attributes:
        momentum: Keras convention, `moving = momentum * moving + (1 -
            momentum) * batch`; None for the cumulative average over
            `num_batches_tracked` batches.
        epsilon: The layer's epsilon (renorm derives stddevs with it).
        variance_estimator: `"biased"` (divide by n) or `"unbiased"` (n - 1)
            for the stored moving variance.
        renorm_momentum: Momentum of `renorm_mean` / `renorm_stddev`; None
            for a layer without renorm.
    """

    momentum: float | None
    epsilon: float
    variance_estimator: str = "biased"
    renorm_momentum: float | None = None


def broadcast(value: tf.Tensor, rank: int, feature_axes: Sequence[int]) -> tf.Tensor:
    """Reshapes a parameter-shaped tensor to broadcast against an input of `rank`."""
    shape = [1] * rank
    for axis, size in zip(feature_axes, value.shape):
        shape[axis] = size
    return tf.reshape(value, shape)


def fused_blocker(
    rank: int,
    feature_axes: Sequence[int],
    dtype,
    *,
    renorm: bool = False,
    virtual_batch_size: int | None = None,
    synchronized: bool = False,
    masked: bool = False,
    adjustment: bool = False,
) -> str | None:
    """Why the fused kernel cannot run this configuration, or None when it can.

    Args:
        rank: Input rank.
        feature_axes: Sorted non-negative feature axes.
        dtype: The dtype the input reaches the kernel in.
        renorm, virtual_batch_size, synchronized, masked, adjustment: The
            options only the closed-form path implements.

    Returns:
        A phrase for an error message ("it normalizes over several axes"),
        or None.
    """
    if len(feature_axes) != 1:
        return f"it normalizes over several axes ({list(feature_axes)})"
    if fused.layout(rank, feature_axes[0]) is None:
        return (
            f"feature axis {feature_axes[0]} of a rank-{rank} input is neither the last "
            "axis nor axis 1 of a rank 2 to 5 input"
        )
    if tf.as_dtype(dtype) not in fused.SUPPORTED_DTYPES:
        return f"the compute dtype {tf.as_dtype(dtype).name} is not float32, float16 or bfloat16"
    reasons = (
        (renorm, "renorm=True"),
        (virtual_batch_size is not None, f"virtual_batch_size={virtual_batch_size}"),
        (synchronized, "synchronized=True"),
        (masked, "a mask was passed"),
        (adjustment, "an adjustment was passed"),
    )
    return next((reason for blocked, reason in reasons if blocked), None)


def _affine(gamma, beta, shape) -> tuple[tf.Tensor, tf.Tensor]:
    gamma = tf.ones(shape) if gamma is None else tf.convert_to_tensor(gamma)
    beta = tf.zeros(shape) if beta is None else tf.convert_to_tensor(beta)
    return gamma, beta


def inference(
    x: tf.Tensor,
    gamma: tf.Tensor | None,
    beta: tf.Tensor | None,
    moving_mean: tf.Tensor,
    moving_variance: tf.Tensor,
    feature_axes: Sequence[int],
    epsilon: float,
) -> tf.Tensor:
    """`x * a + b` with the moving statistics; float32 output.

    Args:
        x: Input of any float dtype.
        gamma, beta: Parameter-shaped scale and offset, or None (1 and 0).
        moving_mean, moving_variance: Parameter-shaped float32 statistics.
        feature_axes: Sorted non-negative feature axes of `x`.
        epsilon: Added to the variance.

    Returns:
        The float32 output. One multiply-add per value, with the operand
        order of the stock Keras layer, so the two agree bit for bit.
    """
    x = tf.cast(x, tf.float32)
    rank = x.shape.rank
    gamma, beta = _affine(gamma, beta, moving_mean.shape)
    a = gamma * tf.math.rsqrt(moving_variance + epsilon)
    b = beta - moving_mean * a
    return x * broadcast(a, rank, feature_axes) + broadcast(b, rank, feature_axes)


def _values_per_feature_known(x: tf.Tensor, feature_axes: Sequence[int]) -> int | None:
    sizes = [x.shape[axis] for axis in range(x.shape.rank) if axis not in feature_axes]
    return None if any(size is None for size in sizes) else math.prod(sizes)


def trusted(mean: tf.Tensor, variance: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    """Per feature: may these batch statistics update the moving ones?

    A feature needs `MIN_VALUES_PER_FEATURE` values with positive weight (a
    feature masked out of this batch keeps its statistics). A non-finite
    statistic anywhere marks the whole batch as broken: no feature of it is
    trusted.

    Args:
        mean, variance: The batch statistics.
        values: How many values with positive weight each feature had.

    Returns:
        A bool tensor shaped like `mean`.
    """
    finite = tf.reduce_all(tf.math.is_finite(mean)) & tf.reduce_all(tf.math.is_finite(variance))
    return (values >= MIN_VALUES_PER_FEATURE) & finite


def training(
    x: tf.Tensor,
    gamma: tf.Tensor | None,
    beta: tf.Tensor | None,
    statistics: MovingStatistics,
    feature_axes: Sequence[int],
    epsilon: float,
    *,
    use_fused_kernel: bool = False,
    mask: tf.Tensor | None = None,
    virtual_batch_size: int | None = None,
    synchronized: bool = False,
    renorm_clipping: Mapping | None = None,
    adjustment: Callable | None = None,
) -> tuple[tf.Tensor, BatchStatistics]:
    """Normalizes `x` with its batch statistics.

    Args:
        x: The input. With `use_fused_kernel` it reaches the kernel in its own
            dtype (float32, float16 or bfloat16); otherwise it is cast to
            float32.
        gamma, beta: Parameter-shaped float32 scale and offset, or None.
        statistics: The moving statistics; they normalize features with no
            values at all (an empty or fully masked batch), and with renorm
            `renorm_mean` / `renorm_stddev` give the correction.
        feature_axes: Sorted non-negative feature axes of `x`.
        epsilon: Added to the variance.
        use_fused_kernel: Run `FusedBatchNormV3` (check `fused_blocker` first).
        mask: Optional weights broadcastable against `x` (0 drops a value from
            the statistics).
        virtual_batch_size: Ghost-batch size (tf-keras' definition).
        synchronized: Global statistics under a multi-replica strategy.
        renorm_clipping: A validated clipping dict to apply Batch
            Renormalization; None for plain BN.
        adjustment: tf.layers' `adjustment(shape) -> (scale, bias)`.

    Returns:
        `(outputs, batch)`: the output (float32, or the input dtype on the
        fused kernel) and the `BatchStatistics`.

    Raises:
        ValueError: When `virtual_batch_size` does not divide a static batch size.
    """
    shape = statistics.moving_mean.shape
    gamma, beta = _affine(gamma, beta, shape)
    static_values = _values_per_feature_known(x, feature_axes)
    if static_values == 1 and mask is None:
        warnings.warn(
            f"Batch normalization in training mode got one value per feature (input "
            f"shape {tuple(x.shape)}, feature axes {list(feature_axes)}): the output is "
            "beta and the moving statistics are left unchanged, since one value has no "
            "variance. Use batches of at least 2, or training=False.",
            stacklevel=4,
        )
    if use_fused_kernel:
        data_format, expand_axis = fused.layout(x.shape.rank, feature_axes[0])
        outputs, mean, variance, count = fused.batch_norm_training(
            fused.to_kernel_rank(x, expand_axis), gamma, beta, epsilon, data_format
        )
        if expand_axis is not None:
            outputs = tf.reshape(outputs, tf.shape(x))
        count = tf.fill(shape, count)
        values = count
    else:
        ghost = virtual_batch_size
        if ghost is not None and x.shape[0] is not None and x.shape[0] % ghost:
            raise ValueError(
                f"`virtual_batch_size`={ghost} must divide the batch size in training "
                f"mode; received inputs of shape {tuple(x.shape)}."
            )
        renorm_statistics = None
        if renorm_clipping is not None:
            renorm_statistics = (statistics.renorm_mean, statistics.renorm_stddev)
        outputs, mean, variance, count, values = closed_form.normalize_features(
            tf.cast(x, tf.float32),
            gamma,
            beta,
            statistics.moving_mean,
            statistics.moving_variance,
            feature_axes,
            epsilon,
            mask=mask,
            virtual_batch_size=ghost,
            synchronized=synchronized,
            renorm_statistics=renorm_statistics,
            renorm_clipping=renorm_clipping,
            adjustment=adjustment,
        )
    batch = BatchStatistics(mean, variance, count, trusted(mean, variance, values))
    return outputs, batch


def normalize(
    x: tf.Tensor,
    gamma: tf.Tensor | None,
    beta: tf.Tensor | None,
    statistics: MovingStatistics,
    feature_axes: Sequence[int],
    epsilon: float,
    *,
    training_mode,
    **training_options,
) -> tuple[tf.Tensor, BatchStatistics | None]:
    """Training or inference, chosen by a resolved training flag.

    Args:
        x, gamma, beta, statistics, feature_axes, epsilon: As for `training`.
        training_mode: True, False, or a scalar `tf.bool` tensor (see
            `tfbn.nn.training_flag.resolve_training`).
        **training_options: Keyword arguments of `training`.

    Returns:
        `(outputs, batch)`. `batch` is None when `training_mode` is False; behind
        a tensor flag it is the training branch's statistics with `valid`
        False wherever the flag is False at run time, so an update built from
        it leaves every statistic bit-identical in inference.
    """

    def infer():
        return inference(
            x,
            gamma,
            beta,
            statistics.moving_mean,
            statistics.moving_variance,
            feature_axes,
            epsilon,
        )

    def train():
        return training(x, gamma, beta, statistics, feature_axes, epsilon, **training_options)

    if training_mode is False:
        return infer(), None
    if training_mode is True:
        return train()
    shape = statistics.moving_mean.shape

    def train_branch():
        outputs, batch = train()
        return outputs, batch.mean, batch.variance, batch.count, batch.valid

    def inference_branch():
        dtype = x.dtype if training_options.get("use_fused_kernel") else tf.float32
        zeros = tf.zeros(shape)
        return tf.cast(infer(), dtype), zeros, zeros, zeros, tf.zeros(shape, tf.bool)

    outputs, *fields = tf.cond(training_mode, train_branch, inference_branch)
    return outputs, BatchStatistics(*fields)


def updated_statistics(
    old: MovingStatistics, batch: BatchStatistics, rule: UpdateRule
) -> MovingStatistics:
    """The moving statistics after folding in one batch.

    Args:
        old: The current statistics. In a TF1 `Session`, pass the values the
            forward pass read (a second read may see an update that already ran).
        batch: The batch's statistics from `training` or `normalize`.
        rule: The momentum, epsilon, variance convention and renorm momentum.

    Returns:
        The new `MovingStatistics`, with the same fields present as `old`.
        Features whose batch statistics are not `valid` keep their value bit
        for bit. With a cumulative average one count serves every feature, so
        a batch then updates every feature or none.
    """
    variance = batch.variance
    if rule.variance_estimator == "unbiased":
        variance = moments.bessel_corrected(variance, batch.count)
    valid = batch.valid
    num_batches = old.num_batches_tracked
    next_num_batches = None
    if rule.momentum is None:
        if num_batches is None:
            raise ValueError(
                "A cumulative average (momentum=None) needs `num_batches_tracked` in the "
                "moving statistics."
            )
        every = tf.reduce_all(valid)
        valid = tf.fill(tf.shape(valid), every)
        next_num_batches = num_batches + tf.cast(every, num_batches.dtype)

    def folded(old_value, batch_value):
        new = moving_averages.update_moving_statistic(
            old_value, batch_value, rule.momentum, num_batches
        )
        return tf.where(valid, new, old_value)

    moving_mean = folded(old.moving_mean, batch.mean)
    if rule.renorm_momentum is None:
        return MovingStatistics(
            moving_mean=moving_mean,
            moving_variance=folded(old.moving_variance, variance),
            num_batches_tracked=next_num_batches,
        )
    renormed = renorm_lib.updated_statistics(
        renorm_lib.RenormStatistics(
            moving_stddev=old.moving_stddev,
            moving_variance=old.moving_variance,
            renorm_mean=old.renorm_mean,
            renorm_stddev=old.renorm_stddev,
        ),
        batch.mean,
        variance,
        epsilon=rule.epsilon,
        momentum=rule.momentum,
        renorm_momentum=rule.renorm_momentum,
        valid=valid,
        num_batches=num_batches,
    )
    return MovingStatistics(
        moving_mean=moving_mean,
        moving_variance=renormed.moving_variance,
        moving_stddev=renormed.moving_stddev,
        renorm_mean=renormed.renorm_mean,
        renorm_stddev=renormed.renorm_stddev,
        num_batches_tracked=next_num_batches,
    )
