"""`tfbn.compat.v1.batch_norm`: `tf.contrib.layers.batch_norm` / `slim.batch_norm` on TF 2.21.

Same arguments and defaults (`decay=0.999`, `scale=False`,
`is_training=True`, ...), same variable names (`<scope>/BatchNorm/beta`,
`moving_mean`, ...), same `updates_collections` contract, so slim-era model
code and checkpoints run unchanged apart from the import.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from tfbn.compat.v1 import _graph_bn
from tfbn.compat.v1.slim_arg_scope import scoped_like
from tfbn.nn import arguments
from tfbn.nn import renorm as renorm_lib

_DEFAULT_SCOPE = "BatchNorm"
_VARIABLE_NAMES = ("beta", "gamma", "moving_mean", "moving_variance")
_ALL_VARIABLE_NAMES = _VARIABLE_NAMES + _graph_bn.RENORM_VARIABLE_NAMES
_DATA_FORMATS = ("NHWC", "NCHW")


def _checked_dict(argument: str, value, allowed) -> dict:
    value = dict(value or {})
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(
            f"`{argument}` has unknown keys {unknown}; the keys are {list(allowed)}. "
            f"Received {value!r}."
        )
    return value


def _variable_collections(variables_collections) -> dict[str, list]:
    """contrib's collections: GLOBAL + MODEL_VARIABLES + the user's, per name.

    `get_variable` adds `TRAINABLE_VARIABLES` itself for trainable ones.
    """
    result = {}
    for name in _ALL_VARIABLE_NAMES:
        if isinstance(variables_collections, dict):
            extra = variables_collections.get(name) or []
        else:
            extra = variables_collections or []
        extra = [extra] if isinstance(extra, str) else list(extra)
        base = [tf.compat.v1.GraphKeys.GLOBAL_VARIABLES, tf.compat.v1.GraphKeys.MODEL_VARIABLES]
        result[name] = list(dict.fromkeys(base + extra))
    return result


# Defaults set by `slim.arg_scope([slim.batch_norm], ...)` apply here too.
@scoped_like("tf_slim.layers.layers", "batch_norm")
def batch_norm(
    inputs,
    decay=0.999,
    center=True,
    scale=False,
    epsilon=0.001,
    activation_fn: Callable | None = None,
    param_initializers=None,
    param_regularizers=None,
    updates_collections=tf.compat.v1.GraphKeys.UPDATE_OPS,
    is_training=True,
    reuse=None,
    variables_collections=None,
    outputs_collections=None,
    trainable=True,
    batch_weights=None,
    fused=None,
    data_format="NHWC",
    zero_debias_moving_mean=False,
    scope=None,
    renorm=False,
    renorm_clipping=None,
    renorm_decay=0.99,
    adjustment=None,
    moving_variance_estimator: str | None = None,
):
    """Batch normalization in a `tf.compat.v1` graph, contrib/slim style.

    Normalizes over every axis but the channel axis (last for NHWC, 1 for
    NCHW). In training mode the moving statistics get one assign op each,
    added to `updates_collections` (default `UPDATE_OPS`) under the layer's
    name scope; they only run when the train op depends on them, e.g. via
    `tfbn.compat.v1.minimize_with_updates`. With `updates_collections=None`
    the output depends on them instead, so they run whenever it is computed.

    Variables (`tf.compat.v1.get_variable`, in variable scope `scope`,
    default `BatchNorm` uniquified): `beta` (if `center`), `gamma` (if
    `scale`), `moving_mean`, `moving_variance`; all are in
    `GLOBAL_VARIABLES` and `MODEL_VARIABLES`, beta/gamma also in
    `TRAINABLE_VARIABLES` when `trainable`. With `renorm` (contrib ran it
    through tf.layers' BatchNormalization) `moving_stddev`, `renorm_mean`
    and `renorm_stddev` follow, in the tf-keras / Keras 3 layout, and three
    more update ops; TF1.x renorm checkpoints with zero-debias
    `renorm_mean_weight`/`renorm_stddev_weight` are not supported.

    Moving variance convention: with `moving_variance_estimator=None` the
    numbers are TF1's. contrib ran the fused kernel (`fused` None or True,
    rank 2 or 4, no `batch_weights`, renorm or adjustment) whose stored
    variance is Bessel-corrected (`n / (n - 1)`); elsewhere it stored the
    biased variance. Pass `"biased"` or `"unbiased"` to choose. The fused
    path raises epsilon to at least 1.001e-5, as TF1's kernel did. The
    numbers are those of `tfbn.BatchNormalization` with the same settings.

    Args:
        inputs: Tensor of rank >= 2 with the batch on axis 0.
        decay: Moving-average decay (Keras' momentum): `moving = decay *
            moving + (1 - decay) * batch`. Lower it (0.9-0.99) for short runs.
        center: Whether to add the offset `beta`.
        scale: Whether to multiply by `gamma`. Off by default, as in contrib;
            fine when the next layer is linear.
        epsilon: Small float added to the variance.
        activation_fn: Optional activation applied to the output.
        param_initializers: Optional dict of initializers keyed by `beta`,
            `gamma`, `moving_mean`, `moving_variance`.
        param_regularizers: Optional dict of regularizers keyed by `beta`,
            `gamma`.
        updates_collections: Collection name (or list) for the update ops, or
            None to force them with the output.
        is_training: Python bool (or 0/1, NumPy bool) or a scalar `tf.bool`
            tensor/placeholder. Fed False, the moving statistics are used and
            the update ops write back the old values bit for bit.
        reuse: Whether to reuse the variables of `scope`.
        variables_collections: Extra collections for the variables: a list
            (all variables) or a dict keyed by variable name.
        outputs_collections: Collections to add the output to.
        trainable: Whether beta and gamma are trainable variables.
        batch_weights: Optional `[batch_size]` weights of the samples in the
            batch statistics.
        fused: None/True (TF1: fused when possible) or False; selects TF1's
            numbers (variance estimator, epsilon floor) and, for speed,
            whether the fused kernel may run (False: the general path).
        data_format: `"NHWC"` (channels last) or `"NCHW"` (channels on axis 1).
        zero_debias_moving_mean: Zero-debiasing is not available; True raises.
        scope: Optional variable scope name.
        renorm: Whether to use Batch Renormalization, with the numerics of
            `tfbn.BatchNormalization(renorm=True)` (tf-keras / Keras 3).
        renorm_clipping: Dict with optional keys `"rmax"`, `"rmin"`, `"dmax"`
            clipping `r` to `[rmin, rmax]` and `d` to `[-dmax, dmax]`.
        renorm_decay: Momentum of `renorm_mean` and `renorm_stddev`
            (`renorm_momentum` of the Keras layer).
        adjustment: tf.layers' `adjustment(tf.shape(inputs)) -> (scale,
            bias)`, applied in training only.
        moving_variance_estimator: None (TF1's numbers), `"biased"` or
            `"unbiased"`.

    Returns:
        The output tensor, shaped and typed like `inputs`.

    Raises:
        ValueError: For an invalid argument or unsupported option.
        TypeError: For an `is_training` value that is not a boolean.
    """
    decay = arguments.momentum(decay, name="decay")
    epsilon = arguments.epsilon(epsilon)
    renorm_settings = (
        _graph_bn.Renorm(
            renorm_lib.validate_clipping(renorm_clipping),
            arguments.momentum(renorm_decay, name="renorm_decay"),
        )
        if renorm
        else None
    )
    if zero_debias_moving_mean:
        raise ValueError(
            "`zero_debias_moving_mean=True` is not supported by tfbn.compat.v1."
            "batch_norm; pass False and lower `decay` (e.g. 0.9) for short runs."
        )
    if data_format not in _DATA_FORMATS:
        raise ValueError(f"`data_format` must be one of {_DATA_FORMATS}; received {data_format!r}.")
    initializers = _checked_dict("param_initializers", param_initializers, _VARIABLE_NAMES)
    regularizers = _checked_dict("param_regularizers", param_regularizers, ("beta", "gamma"))
    inputs = tf.convert_to_tensor(inputs)
    rank = inputs.shape.rank
    if rank is not None and rank < 2:
        raise ValueError(
            f"`inputs` must have rank >= 2 (batch, ..., channels); received shape {inputs.shape}."
        )
    axes = arguments.feature_axes(1 if data_format == "NCHW" else -1, rank)
    fused_path = (
        fused is not False
        and rank in (2, 4)
        and batch_weights is None
        and adjustment is None
        and not renorm
    )
    estimator = _graph_bn.resolve_variance_estimator(moving_variance_estimator, fused_path)
    if fused_path:
        epsilon = max(float(epsilon), _graph_bn.FUSED_MIN_EPSILON)

    with tf.compat.v1.variable_scope(
        scope, default_name=_DEFAULT_SCOPE, values=[inputs], reuse=reuse
    ):
        variables = _graph_bn.create_variables(
            _graph_bn.param_shape_for(inputs, axes),
            scale=scale,
            center=center,
            initializers=initializers,
            regularizers=regularizers,
            constraints={},
            trainable=trainable,
            collections=_variable_collections(variables_collections),
            renorm=renorm,
        )
        outputs, updates = _graph_bn.normalize(
            inputs,
            variables,
            feature_axes=axes,
            epsilon=epsilon,
            momentum=decay,
            training=is_training,
            variance_estimator=estimator,
            fused_kernel=fused is not False,
            batch_weights=batch_weights,
            adjustment=adjustment,
            renorm=renorm_settings,
        )
        outputs = _graph_bn.register_updates(updates, outputs, updates_collections)
        outputs = tf.cast(outputs, inputs.dtype)
        if activation_fn is not None:
            outputs = activation_fn(outputs)
        if outputs_collections:
            tf.compat.v1.add_to_collections(outputs_collections, outputs)
        return outputs
