"""`tfbn.BatchNormalization`: a drop-in for `keras.layers.BatchNormalization`.

What it adds to the stock layer, each pinned by tests:

* explicit, scope-aware moving-statistics updates (`tfbn.deferred_updates`);
* a training flag that may be a scalar `tf.bool` tensor inside `tf.function`;
* multi-axis normalisation (`axis=[1, 3]`);
* `momentum=None`: a cumulative average since `reset_moving_statistics()`;
* `moving_variance_estimator="unbiased"` (Bessel-corrected, as TF1 and
  PyTorch store it);
* ghost batches (`virtual_batch_size`, with tf-keras' definition);
* float32 statistics whatever the dtype policy, accurate for large offsets;
* updates only from batches that can be trusted (empty, fully masked or
  non-finite batches leave the moving statistics bit-identical);
* argument validation that names the argument, the value and the fix;
* speed: the fused kernel where its semantics match (`tfbn.fused`), and a
  closed-form backward everywhere else (`tfbn.closed_form`).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfbn.deferred_updates import PendingUpdate, active_collector
from tfbn.nn import closed_form, moving_averages
from tfbn.nn import fused as fused_lib
from tfbn.nn import moments as moments_lib
from tfbn.nn import renorm as renorm_lib
from tfbn.nn.training_flag import resolve_training

VARIANCE_ESTIMATORS = ("biased", "unbiased")
# An update needs at least two values per feature: with one, the variance is
# 0 (biased) or undefined (unbiased) and says nothing about the population.
_MIN_VALUES_PER_FEATURE = 2


def _normalize_axes(axis) -> list[int]:
    if isinstance(axis, bool) or not isinstance(axis, (int, list, tuple)):
        raise TypeError(
            f"`axis` must be an int or a list of ints; received {axis!r}. "
            "Example: axis=-1 (channels last) or axis=[1, 3]."
        )
    axes = [axis] if isinstance(axis, int) else list(axis)
    if not axes or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
        raise TypeError(f"`axis` must be a non-empty list of ints; received {axis!r}.")
    if len(set(axes)) != len(axes):
        raise ValueError(f"`axis` has duplicate entries: {axis!r}.")
    return axes


def _validate_momentum(name: str, momentum, allow_none: bool) -> float | None:
    if momentum is None and allow_none:
        return None
    try:
        value = float(momentum)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a float in [0, 1); received {momentum!r}.") from None
    if not 0.0 <= value < 1.0:
        hint = " (or None for a cumulative average)" if allow_none else ""
        raise ValueError(
            f"`{name}` must be in [0, 1){hint}; received {momentum!r}. Keras' "
            "convention is moving = momentum * moving + (1 - momentum) * batch, "
            "so PyTorch's momentum=0.1 is 0.9 here."
        )
    return value


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
        momentum: Momentum of the moving averages in [0, 1), Keras convention:
            `moving = momentum * moving + (1 - momentum) * batch`. None gives
            the cumulative average of all batches since the last
            `reset_moving_statistics()` (the paper's population statistics).
        epsilon: Positive constant added to the variance.
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
            requires the fused kernel and raises a ValueError naming what
            prevents it. Both paths give the same results within float32
            rounding (moving statistics included).
        **kwargs: Base layer arguments (`name`, `dtype`, `trainable`, ...).

    Call arguments:
        inputs: A tensor of any rank >= 1.
        training: Python bool, None, or a scalar `tf.bool` tensor.
        mask: Optional boolean mask shaped like `inputs` without the feature
            axes; masked values do not enter the statistics.
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
        self._axes = _normalize_axes(axis)
        self.axis = axis if isinstance(axis, int) else list(axis)
        self.momentum = _validate_momentum("momentum", momentum, allow_none=True)
        try:
            self.epsilon = float(epsilon)
        except (TypeError, ValueError):
            raise TypeError(f"`epsilon` must be a float; received {epsilon!r}.") from None
        if not self.epsilon > 0.0:
            raise ValueError(
                f"`epsilon` must be > 0; received {epsilon!r}. It keeps "
                "1 / sqrt(variance + epsilon) finite; 1e-3 (Keras) or 1e-5 "
                "(TF1, PyTorch) are the usual values."
            )
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
        self.renorm_momentum = _validate_momentum(
            "renorm_momentum", renorm_momentum, allow_none=False
        )
        self.synchronized = bool(synchronized)
        if moving_variance_estimator not in VARIANCE_ESTIMATORS:
            raise ValueError(
                "`moving_variance_estimator` must be one of "
                f"{VARIANCE_ESTIMATORS}; received {moving_variance_estimator!r}."
            )
        self.moving_variance_estimator = moving_variance_estimator
        if virtual_batch_size is not None:
            if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
                raise TypeError(
                    "`virtual_batch_size` must be a positive int or None; "
                    f"received {virtual_batch_size!r}."
                )
            if virtual_batch_size < 2:
                raise ValueError(
                    "`virtual_batch_size` must be >= 2 (a ghost batch of one "
                    f"sample has no variance); received {virtual_batch_size}."
                )
            if self.synchronized:
                raise ValueError(
                    "`virtual_batch_size` and `synchronized=True` contradict "
                    "each other (ghost batches are local by definition); "
                    "choose one."
                )
        self.virtual_batch_size = virtual_batch_size
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"`fused` must be None, True or False; received {fused!r}.")
        self.fused = fused
        self.supports_masking = True

        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self.num_batches_tracked = None

    # ------------------------------------------------------------------ build

    def _feature_axes(self, rank: int) -> list[int]:
        axes = []
        for axis in self._axes:
            if not -rank <= axis < rank:
                raise ValueError(f"`axis`={self.axis!r} is out of range for inputs of rank {rank}.")
            axes.append(axis % rank)
        return sorted(axes)

    def build(self, input_shape):
        rank = len(input_shape)
        axes = self._feature_axes(rank)
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
        fused = self._use_fused(mask)
        # The fused kernel takes low-precision inputs with float32 statistics.
        x = tf.cast(inputs, self.compute_dtype if fused else tf.float32)
        if mask is not None:
            mask = self._expand_mask(mask, x)
        if mode is False:
            outputs = self._inference(x)
        elif mode is True:
            outputs, update = self._training(x, mask, fused)
            self._record_update(*update)
        else:
            outputs, update = self._training_or_inference(mode, x, mask, fused)
            self._record_update(*update)
        return tf.cast(outputs, self.compute_dtype)

    def _fused_ineligibility(self, mask) -> str | None:
        """Why the fused kernel cannot run this call, or None if it can."""
        if len(self._feature_axes_built) != 1:
            return f"it normalizes over several axes (axis={self.axis!r})"
        if fused_lib.layout(self._rank, self._feature_axes_built[0]) is None:
            return (
                f"axis={self.axis!r} of a rank-{self._rank} input is neither the "
                "last axis nor axis 1 of a rank 2 to 5 input"
            )
        if tf.as_dtype(self.compute_dtype) not in fused_lib.SUPPORTED_DTYPES:
            return f"the compute dtype {self.compute_dtype} is not float32, float16 or bfloat16"
        if self.renorm:
            return "renorm=True"
        if self.virtual_batch_size is not None:
            return f"virtual_batch_size={self.virtual_batch_size}"
        if self.synchronized:
            return "synchronized=True"
        if mask is not None:
            return "a mask was passed"
        return None

    def _use_fused(self, mask) -> bool:
        if self.fused is False:
            return False
        reason = self._fused_ineligibility(mask)
        if reason is not None and self.fused:
            raise ValueError(
                f"BatchNormalization {self.name!r} has fused=True but the fused "
                f"kernel cannot run: {reason}. Use fused=None to pick the "
                "kernel automatically, or fused=False."
            )
        return reason is None

    def _expand_mask(self, mask, x):
        """Reshapes a mask without feature axes to broadcast against `x`."""
        mask = tf.convert_to_tensor(mask)
        expected_rank = self._rank - len(self._feature_axes_built)
        if mask.shape.rank != expected_rank:
            raise ValueError(
                f"`mask` must have the input's shape without the feature axes "
                f"(rank {expected_rank}); received mask shape {mask.shape} for "
                f"inputs of shape {x.shape} and axis={self.axis!r}."
            )
        for axis in self._feature_axes_built:
            mask = tf.expand_dims(mask, axis)
        return tf.cast(mask, tf.float32)

    def _broadcast(self, value):
        """Reshapes a parameter-shaped tensor to broadcast against the input."""
        shape = [1] * self._rank
        for axis, size in zip(self._feature_axes_built, self._param_shape):
            shape[axis] = size
        return tf.reshape(value, shape)

    def _affine_parameters(self):
        gamma = self.gamma.value if self.scale else tf.ones(self._param_shape)
        beta = self.beta.value if self.center else tf.zeros(self._param_shape)
        return tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta)

    def _inference(self, x):
        # x * a + b on every path: as fast as the fused inference kernel here
        # (BENCHMARKS.md) and bit-identical to the stock Keras layer.
        x = tf.cast(x, tf.float32)
        gamma, beta = self._affine_parameters()
        # The precomputed constants a and b: one multiply-add per value.
        a = gamma * tf.math.rsqrt(self.moving_variance.value + self.epsilon)
        b = beta - self.moving_mean.value * a
        return x * self._broadcast(a) + self._broadcast(b)

    def _check_values_per_feature(self, x):
        static = [
            x.shape[axis] for axis in range(self._rank) if axis not in self._feature_axes_built
        ]
        if all(size is not None for size in static):
            count = 1
            for size in static:
                count *= size
            if count == 1:
                raise ValueError(
                    f"BatchNormalization {self.name!r} got one value per "
                    f"feature in training mode (input shape {tuple(x.shape)}, "
                    f"axis={self.axis!r}): its variance is undefined. Use a "
                    "batch of at least 2, or call with training=False."
                )

    def _kernel_view(self, x):
        """`x` as the fused kernel's rank 4 or 5 input, and its data format."""
        data_format, expand_axis = fused_lib.layout(self._rank, self._feature_axes_built[0])
        return fused_lib.to_kernel_rank(x, expand_axis), data_format

    def _training(self, x, mask, fused=False):
        """Normalizes with batch statistics.

        Returns:
            `(outputs, update)` where `update` is `(mean, variance, count,
            valid)` in the parameter shape, for `_record_update`.
        """
        self._check_values_per_feature(x)
        if fused:
            gamma, beta = self._affine_parameters()
            kernel_x, data_format = self._kernel_view(x)
            outputs, mean, variance, count = fused_lib.batch_norm_training(
                kernel_x, gamma, beta, self.epsilon, data_format
            )
            outputs = tf.reshape(outputs, tf.shape(x))
            return outputs, self._update_arguments(mean, variance, count)
        ghost = self.virtual_batch_size
        if ghost is not None and x.shape[0] is not None and x.shape[0] % ghost:
            raise ValueError(
                f"`virtual_batch_size`={ghost} must divide the batch size in "
                f"training mode; received inputs of shape {tuple(x.shape)}."
            )
        gamma, beta = self._affine_parameters()
        renorm_statistics = None
        if self.renorm:
            renorm_statistics = (
                tf.convert_to_tensor(self.renorm_mean.value),
                tf.convert_to_tensor(self.renorm_stddev.value),
            )
        outputs, mean, variance, count = closed_form.normalize_features(
            x,
            gamma,
            beta,
            tf.convert_to_tensor(self.moving_mean.value),
            tf.convert_to_tensor(self.moving_variance.value),
            self._feature_axes_built,
            self.epsilon,
            mask=mask,
            virtual_batch_size=ghost,
            synchronized=self.synchronized,
            renorm_statistics=renorm_statistics,
            renorm_clipping=self.renorm_clipping,
        )
        return outputs, self._update_arguments(mean, variance, count)

    def _update_arguments(self, update_mean, update_variance, count):
        """`(mean, variance, count, valid)` in the parameter shape."""
        valid = tf.logical_and(
            tf.reduce_all(count >= _MIN_VALUES_PER_FEATURE),
            tf.logical_and(
                tf.reduce_all(tf.math.is_finite(update_mean)),
                tf.reduce_all(tf.math.is_finite(update_variance)),
            ),
        )
        count = tf.reduce_min(count)
        return (
            tf.reshape(update_mean, self._param_shape),
            tf.reshape(update_variance, self._param_shape),
            count,
            valid,
        )

    def _training_or_inference(self, training, x, mask, fused):
        """Both modes behind a `tf.bool` tensor; the update is gated on it."""

        def train_branch():
            outputs, (mean, variance, count, valid) = self._training(x, mask, fused)
            return outputs, mean, variance, count, valid

        def inference_branch():
            return (
                self._inference(x),
                tf.zeros(self._param_shape),
                tf.zeros(self._param_shape),
                tf.zeros([]),
                tf.constant(False),
            )

        outputs, mean, variance, count, valid = tf.cond(training, train_branch, inference_branch)
        return outputs, (mean, variance, count, valid)

    # ---------------------------------------------------------- updates

    def _record_update(self, mean, variance, count, valid):
        def apply_fn():
            return self._apply_update(mean, variance, count, valid)

        collector = active_collector()
        if collector is None:
            ops = apply_fn()
            if not tf.executing_eagerly() and not tf.inside_function():
                # A TF1-style graph runs only what is fetched: publish the
                # update ops where TF1 code looks for them instead of letting
                # them be silently dropped.
                for op in ops:
                    tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.UPDATE_OPS, op)
        else:
            collector.record(
                PendingUpdate(path=self.path or self.name, layer=self, apply_fn=apply_fn)
            )

    def _apply_update(self, mean, variance, count, valid) -> list:
        """Folds one batch's statistics into the moving statistics.

        Every variable is assigned `where(valid, new, old)`, so an untrusted
        batch (or `training` False behind a tensor) leaves it bit-identical.
        """
        if self.moving_variance_estimator == "unbiased":
            variance = moments_lib.bessel_corrected(variance, count)
        num_batches = self.num_batches_tracked.value if self.momentum is None else None

        def folded(variable, batch, momentum=self.momentum):
            old = tf.convert_to_tensor(variable.value)
            new = moving_averages.update_moving_statistic(old, batch, momentum, num_batches)
            return tf.where(valid, new, old)

        new_values = [(self.moving_mean, folded(self.moving_mean, mean))]
        if self.renorm:
            renormed = renorm_lib.updated_statistics(
                renorm_lib.RenormStatistics(
                    moving_stddev=tf.convert_to_tensor(self.moving_stddev.value),
                    moving_variance=tf.convert_to_tensor(self.moving_variance.value),
                    renorm_mean=tf.convert_to_tensor(self.renorm_mean.value),
                    renorm_stddev=tf.convert_to_tensor(self.renorm_stddev.value),
                ),
                mean,
                variance,
                epsilon=self.epsilon,
                momentum=self.momentum,
                renorm_momentum=self.renorm_momentum,
                valid=valid,
                num_batches=num_batches,
            )
            new_values += [
                (self.moving_stddev, renormed.moving_stddev),
                (self.moving_variance, renormed.moving_variance),
                (self.renorm_mean, renormed.renorm_mean),
                (self.renorm_stddev, renormed.renorm_stddev),
            ]
        else:
            new_values.append((self.moving_variance, folded(self.moving_variance, variance)))
        if self.momentum is None:
            new_values.append((self.num_batches_tracked, num_batches + tf.cast(valid, tf.int64)))
        return [_assign(variable, value) for variable, value in new_values]

    def reset_moving_statistics(self) -> None:
        """Re-initializes the moving statistics (and the cumulative count)."""
        if not self.built:
            return
        for variable, initializer in self._moving_initializers():
            variable.assign(initializer(variable.shape, dtype=variable.dtype))

    def _moving_initializers(self):
        pairs = [
            (self.moving_mean, self.moving_mean_initializer),
            (self.moving_variance, self.moving_variance_initializer),
        ]
        if self.num_batches_tracked is not None:
            pairs.append((self.num_batches_tracked, keras.initializers.Zeros()))
        return pairs

    # ------------------------------------------------------------ config

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "axis": self.axis,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "center": self.center,
                "scale": self.scale,
                "beta_initializer": keras.initializers.serialize(self.beta_initializer),
                "gamma_initializer": keras.initializers.serialize(self.gamma_initializer),
                "moving_mean_initializer": keras.initializers.serialize(
                    self.moving_mean_initializer
                ),
                "moving_variance_initializer": keras.initializers.serialize(
                    self.moving_variance_initializer
                ),
                "beta_regularizer": keras.regularizers.serialize(self.beta_regularizer),
                "gamma_regularizer": keras.regularizers.serialize(self.gamma_regularizer),
                "beta_constraint": keras.constraints.serialize(self.beta_constraint),
                "gamma_constraint": keras.constraints.serialize(self.gamma_constraint),
                "renorm": self.renorm,
                "renorm_clipping": self.renorm_clipping,
                "renorm_momentum": self.renorm_momentum,
                "synchronized": self.synchronized,
                "moving_variance_estimator": self.moving_variance_estimator,
                "virtual_batch_size": self.virtual_batch_size,
                "fused": self.fused,
            }
        )
        return config
