"""`tfbn.BatchNormalization`: a drop-in for `keras.layers.BatchNormalization`.

What it adds to the stock layer (explicit updates, tensor training flags,
several axes, cumulative averages, the unbiased estimator, ghost batches,
float32 statistics accurate far from zero, trusted updates only, validated
arguments, the fused kernel) is listed in the class docstring and pinned by
tests. The numerics and every BN rule live in `tfbn.nn.batch_norm`; this
module holds the Keras wiring: weights, call conventions, updates, config.
"""

from __future__ import annotations

import functools

import keras
import tensorflow as tf

from tfbn.deferred_updates import route_update
from tfbn.nn import arguments
from tfbn.nn import batch_norm as bn
from tfbn.nn import renorm as renorm_lib
from tfbn.nn.training_flag import resolve_training

# The constructor arguments, in signature order, that `get_config` records.
_CONFIG_NAMES = (
    "axis",
    "momentum",
    "epsilon",
    "center",
    "scale",
    "beta_initializer",
    "gamma_initializer",
    "moving_mean_initializer",
    "moving_variance_initializer",
    "beta_regularizer",
    "gamma_regularizer",
    "beta_constraint",
    "gamma_constraint",
    "renorm",
    "renorm_clipping",
    "renorm_momentum",
    "synchronized",
    "moving_variance_estimator",
    "virtual_batch_size",
    "fused",
)


def _assign(variable, value):
    """Assigns and returns the op (graph mode) for control dependencies.

    Keras' own `assign` returns the value, not the op; under a Keras
    stateless scope `variable.value` is a plain tensor and Keras must record
    the update itself.
    """
    target = variable.value
    if isinstance(target, tf.Variable):
        return target.assign(tf.cast(value, target.dtype), read_value=False)
    variable.assign(value)
    return None


@keras.saving.register_keras_serializable(package="tfbn")
class BatchNormalization(keras.layers.Layer):
    """Batch normalization with explicit moving-statistics updates.

    In training mode the layer normalizes each feature with the mean and
    (biased) variance of the current batch, `y = gamma * (x - mean) /
    sqrt(var + epsilon) + beta`, and updates its moving statistics; in
    inference mode it computes `y = x * a + b` with
    `a = gamma / sqrt(moving_variance + epsilon)`, `b = beta - moving_mean * a`.

    The mode: `trainable=False` forces inference mode with no updates (Keras'
    rule for frozen BN); otherwise the `training` argument decides, falling
    back to the Keras call context (`fit` trains, `predict` infers) and then
    to inference.

    Args:
        axis: Feature axis or list of axes (e.g. `-1`, `1` for channels_first,
            `[1, 3]`). Statistics are computed over all other axes.
        momentum: Momentum of the moving averages in [0, 1], Keras convention:
            `moving = momentum * moving + (1 - momentum) * batch` (1.0 keeps
            the statistics frozen). None gives the cumulative average of all
            batches since the last `reset_moving_statistics()` (the paper's
            population statistics). Validated on assignment too.
        epsilon: Constant >= 0 added to the variance (0 warns: a constant
            feature then divides by zero). Validated on assignment too.
        center: Whether to add the learned offset `beta`.
        scale: Whether to multiply by the learned scale `gamma`.
        beta_initializer: Initializer for `beta`.
        gamma_initializer: Initializer for `gamma`.
        moving_mean_initializer: Initializer for `moving_mean`.
        moving_variance_initializer: Initializer for `moving_variance`.
        beta_regularizer: Optional regularizer for `beta`.
        gamma_regularizer: Optional regularizer for `gamma`.
        beta_constraint: Optional constraint for `beta`.
        gamma_constraint: Optional constraint for `gamma`.
        renorm: Whether to use Batch Renormalization (Ioffe, 2017), with the
            numerics of tf-keras and Keras 3.
        renorm_clipping: Dict with optional keys `"rmax"`, `"rmin"`, `"dmax"`
            clipping the correction `r` to `[rmin, rmax]` and `d` to
            `[-dmax, dmax]`; missing keys do not clip.
        renorm_momentum: Momentum of the renorm moving mean and stddev.
        synchronized: If True, under a `tf.distribute` strategy with several
            replicas the batch statistics are those of the global batch.
        moving_variance_estimator: `"biased"` (divide by n, the Keras 3
            default) or `"unbiased"` (divide by n - 1, as TF1's fused kernel
            and PyTorch store it). Only the stored moving variance differs;
            training-mode outputs always use the biased batch variance.
        virtual_batch_size: If set, training mode normalizes ghost batches of
            this many samples (tf-keras' definition: the batch of `N` samples
            is viewed as `[virtual_batch_size, N // virtual_batch_size, ...]`,
            ghost batch `j` being samples `j, j + G, j + 2G, ...`). The moving
            statistics are updated with the mean of the ghost statistics.
            Inference does not depend on it and accepts any batch size.
        fused: Which implementation runs. None (default) uses the fused
            kernel (`FusedBatchNormV3`) when the configuration allows it: one
            feature axis that is last or 1, inputs of rank 2 to 5, a float32,
            float16 or bfloat16 compute dtype, and no renorm, ghost batches,
            mask or synchronization; otherwise the general path with a
            closed-form backward. False always takes the general path. True
            requires the fused kernel: settings that can never run fused
            (renorm, ghost batches, synchronization, several axes) raise a
            ValueError at construction, and what is known only at call time
            (rank, axis, dtype, a mask) raises in training mode (inference
            runs no kernel). Both paths give the same results within float32
            rounding (moving statistics included).
        **kwargs: Base layer arguments (`name`, `dtype`, `trainable`, ...).

    Call arguments:
        inputs: A tensor of any rank >= 1.
        training: Python bool, None, or a scalar `tf.bool` tensor.
        mask: Optional boolean mask shaped like `inputs` without the last
            axis (Keras' convention, as the stock layer reads it for every
            `axis`: it is expanded at the last axis). Masked values do not
            enter the statistics; a feature with no unmasked value keeps its
            moving statistics.

    Differences from `keras.layers.BatchNormalization`, all deliberate:
    statistics in float32 and accurate far from zero; a batch (or feature)
    with fewer than two values, or non-finite statistics, does not update the
    moving statistics (with one value per feature the output is `beta`, as
    in the stock layer, and a warning is logged); `fused=True` is honoured
    rather than ignored.
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        moving_variance_estimator="biased",
        virtual_batch_size=None,
        fused=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._axes = arguments.axis_list(axis)
        self.axis = axis if isinstance(axis, int) else list(axis)
        self.momentum = momentum
        self.epsilon = epsilon
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        self.renorm = bool(renorm)
        self.renorm_clipping = renorm_lib.validate_clipping(renorm_clipping) if renorm else None
        self.renorm_momentum = renorm_momentum
        self.synchronized = bool(synchronized)
        self.moving_variance_estimator = arguments.variance_estimator(moving_variance_estimator)
        self.virtual_batch_size = arguments.virtual_batch_size(virtual_batch_size)
        if self.virtual_batch_size is not None and self.synchronized:
            raise ValueError(
                "`virtual_batch_size` and `synchronized=True` contradict each other (ghost "
                "batches are local by definition); choose one."
            )
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"`fused` must be None, True or False; received {fused!r}.")
        self.fused = fused
        if fused:
            # What can be checked before the rank is known: a stand-in
            # channels-last rank-4 layout for one axis.
            self._check_fusable(
                bn.fused_blocker(
                    4,
                    [3] if len(self._axes) == 1 else self._axes,
                    "float32",
                    renorm=self.renorm,
                    virtual_batch_size=self.virtual_batch_size,
                    synchronized=self.synchronized,
                )
            )
        self.supports_masking = True

        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self.moving_stddev = None
        self.renorm_mean = None
        self.renorm_stddev = None
        self.num_batches_tracked = None

    # Validated on construction and on every later assignment.
    momentum = arguments.Validated(functools.partial(arguments.momentum, allow_none=True))
    epsilon = arguments.Validated(arguments.epsilon)
    renorm_momentum = arguments.Validated(
        functools.partial(arguments.momentum, name="renorm_momentum")
    )

    def _check_fusable(self, reason: str | None) -> None:
        if reason is not None:
            raise ValueError(
                f"BatchNormalization {self.name!r} has fused=True but the fused kernel "
                f"cannot run: {reason}. Use fused=None to pick the kernel automatically, "
                "or fused=False."
            )

    # ------------------------------------------------------------------ build

    def build(self, input_shape):
        rank = len(input_shape)
        axes = arguments.feature_axes(self.axis, rank)
        if self.virtual_batch_size is not None and 0 in axes:
            raise ValueError(
                "`virtual_batch_size` splits the batch axis 0, which is in "
                f"`axis`={self.axis!r}; normalize over other axes or drop it."
            )
        for axis in axes:
            if input_shape[axis] is None:
                raise ValueError(
                    f"Feature axis {axis} of the input has unknown size (input "
                    f"shape {tuple(input_shape)}); BatchNormalization needs it "
                    "to create its weights."
                )
        shape = tuple(int(input_shape[axis]) for axis in axes)
        self._feature_axes_built = axes
        self._rank = rank
        self._param_shape = shape

        def add(name, initializer, trainable, **extra):
            # Statistics assigned in a replica context are averaged over the
            # replicas, so every replica holds the same moving statistics
            # (and, with local batch statistics, not only replica 0's).
            aggregation = "none" if trainable else "mean"
            return self.add_weight(
                shape=shape,
                name=name,
                initializer=initializer,
                trainable=trainable,
                dtype="float32",
                autocast=False,
                aggregation=aggregation,
                **extra,
            )

        if self.scale:
            self.gamma = add(
                "gamma",
                self.gamma_initializer,
                True,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
            )
        if self.center:
            self.beta = add(
                "beta",
                self.beta_initializer,
                True,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
            )
        self.moving_mean = add("moving_mean", self.moving_mean_initializer, False)
        self.moving_variance = add("moving_variance", self.moving_variance_initializer, False)
        if self.renorm:
            # Same extra weights, names and order as Keras 3, so renorm
            # weights interchange with the stock layer.
            variance_initializer = self.moving_variance_initializer

            def stddev_initializer(shape, dtype=None):
                return tf.sqrt(variance_initializer(shape, dtype=dtype))

            self.moving_stddev = add("moving_stddev", stddev_initializer, False)
            self.renorm_mean = add("renorm_mean", self.moving_mean_initializer, False)
            self.renorm_stddev = add("renorm_stddev", stddev_initializer, False)
        if self.momentum is None:
            self.num_batches_tracked = self.add_weight(
                shape=(),
                name="num_batches_tracked",
                initializer="zeros",
                trainable=False,
                dtype="int64",
                autocast=False,
                aggregation="only_first_replica",
            )
        self.input_spec = keras.layers.InputSpec(
            ndim=rank, axes={axis: input_shape[axis] for axis in axes}
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    # ------------------------------------------------------------- call

    def call(self, inputs, training=None, mask=None):
        mode = resolve_training(training) if self.trainable else False
        axes = self._feature_axes_built
        use_fused_kernel = mode is not False and self._use_fused_kernel(mask)
        # The fused kernel takes low-precision inputs with float32 statistics.
        x = tf.cast(inputs, self.compute_dtype if use_fused_kernel else tf.float32)
        outputs, batch = bn.normalize(
            x,
            self.gamma.value if self.scale else None,
            self.beta.value if self.center else None,
            self._read_statistics(),
            axes,
            self.epsilon,
            training_mode=mode,
            use_fused_kernel=use_fused_kernel,
            mask=None if mask is None else self._expand_mask(mask, x),
            virtual_batch_size=self.virtual_batch_size,
            synchronized=self.synchronized,
            renorm_clipping=self.renorm_clipping,
        )
        if batch is not None:
            route_update(self, lambda: self._apply_update(batch))
        return tf.cast(outputs, self.compute_dtype)

    def _use_fused_kernel(self, mask) -> bool:
        if self.fused is False:
            return False
        reason = bn.fused_blocker(
            self._rank,
            self._feature_axes_built,
            self.compute_dtype,
            renorm=self.renorm,
            virtual_batch_size=self.virtual_batch_size,
            synchronized=self.synchronized,
            masked=mask is not None,
        )
        if self.fused:
            self._check_fusable(reason)
        return reason is None

    def _expand_mask(self, mask, x):
        """A Keras mask (the input's shape without the last axis) as weights for `x`."""
        mask = tf.convert_to_tensor(mask)
        if mask.shape.rank != self._rank - 1:
            raise ValueError(
                f"`mask` must have the input's shape without the last axis (rank "
                f"{self._rank - 1}, Keras' convention); received mask shape {mask.shape} "
                f"for inputs of shape {x.shape}."
            )
        return tf.expand_dims(tf.cast(mask, tf.bool), -1)

    # ---------------------------------------------------------- statistics

    @property
    def moving_statistics(self) -> dict:
        """Every moving statistic the layer keeps, by name (`tfbn.nn.batch_norm.STATISTIC_NAMES`).

        `moving_mean` and `moving_variance`; with renorm `moving_stddev`,
        `renorm_mean` and `renorm_stddev`; with `momentum=None`
        `num_batches_tracked`. Empty before the layer is built.
        """
        found = ((name, getattr(self, name)) for name in bn.STATISTIC_NAMES)
        return {name: variable for name, variable in found if variable is not None}

    def _read_statistics(self) -> bn.MovingStatistics:
        return bn.MovingStatistics(
            **{
                name: tf.convert_to_tensor(variable.value)
                for name, variable in self.moving_statistics.items()
            }
        )

    def _apply_update(self, batch: bn.BatchStatistics) -> list:
        """Folds one batch into the moving statistics; returns the assign ops.

        The statistics are read when the update runs, so the updates of a
        layer called twice compose in order.
        """
        rule = bn.UpdateRule(
            momentum=self.momentum,
            epsilon=self.epsilon,
            variance_estimator=self.moving_variance_estimator,
            renorm_momentum=self.renorm_momentum if self.renorm else None,
        )
        new = bn.updated_statistics(self._read_statistics(), batch, rule)
        variables = self.moving_statistics
        return [_assign(variables[name], value) for name, value in new.items()]

    def reset_moving_statistics(self) -> None:
        """Re-initializes every moving statistic (renorm ones and the count included)."""
        if not self.built:
            return
        shape = self._param_shape
        mean = self.moving_mean_initializer(shape, dtype="float32")
        variance = self.moving_variance_initializer(shape, dtype="float32")
        initial = {
            "moving_mean": mean,
            "moving_variance": variance,
            "moving_stddev": tf.sqrt(variance),
            "renorm_mean": mean,
            "renorm_stddev": tf.sqrt(variance),
            "num_batches_tracked": tf.zeros([], tf.int64),
        }
        for name, variable in self.moving_statistics.items():
            variable.assign(initial[name])

    # ------------------------------------------------------------ config

    def get_config(self):
        config = super().get_config()
        serializers = {
            "initializer": keras.initializers.serialize,
            "regularizer": keras.regularizers.serialize,
            "constraint": keras.constraints.serialize,
        }
        for name in _CONFIG_NAMES:
            value = getattr(self, name)
            kind = name.rsplit("_", 1)[-1]
            config[name] = serializers[kind](value) if kind in serializers else value
        return config
