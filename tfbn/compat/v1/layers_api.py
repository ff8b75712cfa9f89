"""`tfbn.compat.v1.batch_normalization`: `tf.compat.v1.layers.batch_normalization` without Keras 2.

Under Keras 3 the stock function raises "`batch_normalization` is not
available with Keras 3". This one keeps its signature, defaults, variable
names (`batch_normalization/gamma`, `batch_normalization_1/...`) and its
`UPDATE_OPS` contract, so TF1 graphs and checkpoints keep working on TF 2.21
without `tf_keras`.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from tfbn.compat.v1 import _graph_bn
from tfbn.nn import arguments
from tfbn.nn import renorm as renorm_lib

_DEFAULT_NAME = "batch_normalization"


def _tf1_fused_blocker(rank, feature_axes, renorm, virtual_batch_size, adjustment) -> str | None:
    """Why TF1 could not use `fused_batch_norm` here, or None when it could.

    TF1's choice decides the default variance convention and epsilon floor
    (see `_graph_bn.resolve_variance_estimator`), so it is TF1's rule, not
    the fused-kernel eligibility of `tfbn.nn.batch_norm.fused_blocker`.
    """
    if rank != 4:
        return f"the input has rank {rank}, not 4"
    if feature_axes not in ([1], [3]):
        return f"the feature axis is {feature_axes}, not 1 (NCHW) or 3 (NHWC)"
    if renorm:
        return "renorm=True"
    if virtual_batch_size is not None:
        return "virtual_batch_size is set"
    if adjustment is not None:
        return "adjustment is set"
    return None


def batch_normalization(
    inputs,
    axis=-1,
    momentum=0.99,
    epsilon=1e-3,
    center=True,
    scale=True,
    beta_initializer=None,
    gamma_initializer=None,
    moving_mean_initializer=None,
    moving_variance_initializer=None,
    beta_regularizer=None,
    gamma_regularizer=None,
    beta_constraint=None,
    gamma_constraint=None,
    training=False,
    trainable=True,
    name=None,
    reuse=None,
    renorm=False,
    renorm_clipping=None,
    renorm_momentum=0.99,
    fused=None,
    virtual_batch_size=None,
    adjustment: Callable | None = None,
    moving_variance_estimator: str | None = None,
    updates_collections=tf.compat.v1.GraphKeys.UPDATE_OPS,
):
    """Batch normalization in a `tf.compat.v1` graph, tf.layers style.

    In training mode each feature is normalized with the batch mean and
    (biased) variance, `gamma * (x - mean) / sqrt(var + epsilon) + beta`, and
    one assign op per moving statistic is added to `UPDATE_OPS`, named
    `<name scope>/AssignMovingAvg[_1]` so `get_collection(UPDATE_OPS, scope)`
    selects one model's or one tower's updates. As in TF1 they only run if
    the train op depends on them (see `minimize_with_updates`). In inference
    mode the moving statistics are used and no update op is created. With
    `renorm`, Batch Renormalization (Ioffe, 2017) corrects the output towards
    the renorm statistics and three more assign ops follow
    (`AssignMovingAvg_2` to `_4`).

    Variables are created with `tf.compat.v1.get_variable` in the variable
    scope `name` (default `batch_normalization`, made unique per scope as TF1
    did: `batch_normalization_1`, ...): `gamma`, `beta` (trainable when
    `trainable`), `moving_mean`, `moving_variance`, and with `renorm` the
    tf-keras / Keras 3 renorm variables `moving_stddev`, `renorm_mean`,
    `renorm_stddev`. A TF1 checkpoint restores with
    `tf.compat.v1.train.Saver`; TF1.x renorm checkpoints, which also hold
    zero-debias `renorm_mean_weight`/`renorm_stddev_weight`, are not
    supported.

    Moving variance convention: with `moving_variance_estimator=None` the
    numbers are TF1's, which stored the Bessel-corrected (`n / (n - 1)`)
    batch variance where it ran the fused kernel (4D input, axis 1 or 3,
    `fused` not False, no renorm/virtual_batch_size/adjustment) and the
    biased one elsewhere. Pass `"biased"` (Keras 3) or `"unbiased"` to choose.
    The fused path also raises `epsilon` to at least 1.001e-5, as TF1's
    kernel did. Training-mode outputs always use the biased batch variance.
    The numbers are those of `tfbn.BatchNormalization` with the same
    settings (its kernels run here: `FusedBatchNormV3` where it can, the
    closed-form general path otherwise).

    Args:
        inputs: Input tensor of known rank; float16/bfloat16/float32/float64.
        axis: Feature axis (int) or list of axes; -1 for NHWC, 1 for NCHW.
        momentum: Moving-average momentum, `moving = momentum * moving +
            (1 - momentum) * batch`.
        epsilon: Small float added to the variance.
        center: Whether to add the offset `beta`.
        scale: Whether to multiply by `gamma`.
        beta_initializer: Initializer for beta (default zeros).
        gamma_initializer: Initializer for gamma (default ones).
        moving_mean_initializer: Initializer for the moving mean (zeros).
        moving_variance_initializer: Initializer for the moving variance (ones).
        beta_regularizer: Optional regularizer for beta.
        gamma_regularizer: Optional regularizer for gamma.
        beta_constraint: Optional constraint for beta (stored on the variable).
        gamma_constraint: Optional constraint for gamma.
        training: Python bool (or 0/1, NumPy bool) or a scalar `tf.bool`
            tensor such as a placeholder. Fed False, the update ops leave the
            moving statistics bit-identical. Default False, as in TF1.
        trainable: Whether gamma and beta go to `TRAINABLE_VARIABLES`. As in
            TF1 (unlike Keras 3) it does not change the mode.
        name: Variable scope name; default `batch_normalization`, uniquified.
        reuse: Whether to reuse the variables of a scope of the same name.
        renorm: Whether to use Batch Renormalization, with the numerics of
            `tfbn.BatchNormalization(renorm=True)` (tf-keras / Keras 3).
        renorm_clipping: Dict with optional keys `"rmax"`, `"rmin"`, `"dmax"`
            clipping `r` to `[rmin, rmax]` and `d` to `[-dmax, dmax]`.
        renorm_momentum: Momentum of `renorm_mean` and `renorm_stddev`.
        fused: None (TF1: fused when possible), True (raises where TF1's fused
            kernel could not run), or False. Selects TF1's numbers (the
            variance estimator and the epsilon floor) and, for speed, whether
            the fused kernel may run; False always takes the general path.
        virtual_batch_size: Ghost-batch size dividing the batch (tf.layers'
            definition); the moving statistics get the mean of the ghost
            statistics.
        adjustment: tf.layers' `adjustment(tf.shape(inputs)) -> (scale,
            bias)`, applied to the normalized value inside gamma/beta in
            training only; with `virtual_batch_size` it gets the shape of the
            ghost-batch view `[virtual_batch_size, N // virtual_batch_size,
            ...]`, as in tf.layers.
        moving_variance_estimator: None (TF1's numbers, see above),
            `"biased"` or `"unbiased"`.
        updates_collections: Collection name (or list) for the update ops, or
            None to force the updates through control dependencies on the
            output.

    Returns:
        The output tensor, with the dtype and shape of `inputs`.

    Raises:
        ValueError: For an invalid argument, `fused=True` where TF1 could not
            fuse, or a variable that exists without `reuse`.
        TypeError: For a `training` value that is not a boolean.
    """
    momentum = arguments.momentum(momentum)
    epsilon = arguments.epsilon(epsilon)
    renorm_settings = (
        _graph_bn.Renorm(
            renorm_lib.validate_clipping(renorm_clipping),
            arguments.momentum(renorm_momentum, name="renorm_momentum"),
        )
        if renorm
        else None
    )
    inputs = tf.convert_to_tensor(inputs)
    axes = arguments.feature_axes(axis, inputs.shape.rank)
    if arguments.virtual_batch_size(virtual_batch_size) is not None and 0 in axes:
        raise ValueError(
            f"`virtual_batch_size` splits the batch axis 0, which is in `axis`={axis!r}."
        )
    blocker = _tf1_fused_blocker(inputs.shape.rank, axes, renorm, virtual_batch_size, adjustment)
    if fused and blocker is not None:
        raise ValueError(
            f"`fused=True` is impossible here because {blocker} (TF1 raised too); "
            "pass fused=None or fused=False."
        )
    fused_path = blocker is None and fused is not False
    estimator = _graph_bn.resolve_variance_estimator(moving_variance_estimator, fused_path)
    if fused_path:
        epsilon = max(float(epsilon), _graph_bn.FUSED_MIN_EPSILON)

    with tf.compat.v1.variable_scope(
        name, default_name=_DEFAULT_NAME, values=[inputs], reuse=reuse
    ):
        variables = _graph_bn.create_variables(
            _graph_bn.param_shape_for(inputs, axes),
            scale=scale,
            center=center,
            initializers={
                "gamma": gamma_initializer,
                "beta": beta_initializer,
                "moving_mean": moving_mean_initializer,
                "moving_variance": moving_variance_initializer,
            },
            regularizers={"gamma": gamma_regularizer, "beta": beta_regularizer},
            constraints={"gamma": gamma_constraint, "beta": beta_constraint},
            trainable=trainable,
            collections={},
            renorm=renorm,
        )
        outputs, updates = _graph_bn.normalize(
            inputs,
            variables,
            feature_axes=axes,
            epsilon=epsilon,
            momentum=momentum,
            training=training,
            variance_estimator=estimator,
            fused_kernel=fused is not False,
            virtual_batch_size=virtual_batch_size,
            adjustment=adjustment,
            renorm=renorm_settings,
        )
        outputs = _graph_bn.register_updates(updates, outputs, updates_collections)
        return tf.cast(outputs, inputs.dtype)
