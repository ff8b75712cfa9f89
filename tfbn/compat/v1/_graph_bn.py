"""The graph-mode batch normalization shared by both `tfbn.compat.v1` styles.

`batch_normalization` (tf.layers style) and `batch_norm` (contrib/slim style)
differ in argument names, defaults, variable scopes and collections; this
module holds their common graph wiring (variables, reading them once,
assign ops, collections). Every BN rule (the numerics, which batches may
update, the update formulas) is `tfbn.nn.batch_norm`'s, the same as for
`tfbn.BatchNormalization`.

Updates are returned as `(variable, new_value)` pairs, each new value
already gated with `tf.where(valid, new, old)`: when the training flag is a
tensor fed False (or the batch cannot be trusted) running the update op
writes the old value back, bit for bit. This is TF1's "momentum 1.0 when
not training" trick without the rounding of `old - (old - batch) * 0`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import tensorflow as tf

from tfbn.nn import arguments
from tfbn.nn import batch_norm as bn
from tfbn.nn.training_flag import resolve_training

# TF1's `tf.nn.fused_batch_norm` silently raised smaller epsilons to this
# (a cuDNN requirement), so fused-path numbers used it.
FUSED_MIN_EPSILON = 1.001e-5
# The extra variables of a renorm layer, in tf-keras / Keras 3 order.
RENORM_VARIABLE_NAMES = ("moving_stddev", "renorm_mean", "renorm_stddev")

Update = tuple[tf.Variable, tf.Tensor]


@dataclasses.dataclass(frozen=True)
class GraphBNVariables:
    """The variables of one graph-mode BN layer.

    `gamma`/`beta` are None when disabled, the renorm ones without renorm.
    """

    gamma: tf.Variable | None
    beta: tf.Variable | None
    moving_mean: tf.Variable
    moving_variance: tf.Variable
    moving_stddev: tf.Variable | None = None
    renorm_mean: tf.Variable | None = None
    renorm_stddev: tf.Variable | None = None


@dataclasses.dataclass(frozen=True)
class Renorm:
    """Batch Renormalization settings (see `tfbn.renorm`).

    Attributes:
        clipping: A validated `renorm_clipping` dict.
        momentum: Momentum of `renorm_mean` and `renorm_stddev`.
    """

    clipping: Mapping
    momentum: float


def _sqrt_of(initializer: Callable) -> Callable:
    """An initializer for a stddev, from the one of its variance (as Keras)."""

    def stddev_initializer(shape, dtype=tf.float32, partition_info=None):
        del partition_info  # Only used by partitioned variables.
        return tf.sqrt(initializer(shape, dtype=dtype))

    return stddev_initializer


def create_variables(
    param_shape: Sequence[int],
    *,
    scale: bool,
    center: bool,
    initializers: dict[str, Callable | None],
    regularizers: dict[str, Callable | None],
    constraints: dict[str, Callable | None],
    trainable: bool,
    collections: dict[str, list[str]],
    renorm: bool = False,
) -> GraphBNVariables:
    """Creates (or reuses) the variables in the current variable scope.

    Args:
        param_shape: Shape of every parameter (one value per feature).
        scale: Whether to create `gamma`.
        center: Whether to create `beta`.
        initializers: Per variable name, an initializer or None for TF1's
            default (ones for gamma and moving_variance, zeros otherwise).
        regularizers: Per name (`gamma`, `beta`), a regularizer or None; its
            loss goes to `REGULARIZATION_LOSSES`, as with TF1.
        constraints: Per name (`gamma`, `beta`), a constraint or None.
        trainable: Whether gamma and beta are trainable variables.
        collections: Per name, the collections the variable belongs to (None
            keeps `get_variable`'s default, `GLOBAL_VARIABLES`).
        renorm: Whether to also create `moving_stddev`, `renorm_mean` and
            `renorm_stddev` (tf-keras' renorm layout), initialized from the
            moving mean and the square root of the moving variance ones.

    Returns:
        A `GraphBNVariables` of float32 variables named as TF1 named them.
    """
    defaults = {
        "gamma": tf.compat.v1.ones_initializer(),
        "beta": tf.compat.v1.zeros_initializer(),
        "moving_mean": tf.compat.v1.zeros_initializer(),
        "moving_variance": tf.compat.v1.ones_initializer(),
    }
    chosen = {name: initializers.get(name) or default for name, default in defaults.items()}
    stddev_initializer = _sqrt_of(chosen["moving_variance"])
    chosen.update(
        moving_stddev=stddev_initializer,
        renorm_mean=chosen["moving_mean"],
        renorm_stddev=stddev_initializer,
    )

    def variable(name, is_trainable=False):
        return tf.compat.v1.get_variable(
            name,
            shape=list(param_shape),
            dtype=tf.float32,
            initializer=chosen[name],
            regularizer=regularizers.get(name),
            constraint=constraints.get(name),
            trainable=is_trainable,
            collections=collections.get(name),
        )

    return GraphBNVariables(
        gamma=variable("gamma", trainable) if scale else None,
        beta=variable("beta", trainable) if center else None,
        moving_mean=variable("moving_mean"),
        moving_variance=variable("moving_variance"),
        **{name: variable(name) for name in RENORM_VARIABLE_NAMES if renorm},
    )


def param_shape_for(inputs: tf.Tensor, feature_axes: Sequence[int]) -> list[int]:
    """The parameter shape; every feature axis must have a known size."""
    shape = [inputs.shape[a] for a in feature_axes]
    if any(size is None for size in shape):
        raise ValueError(
            f"Feature axes {list(feature_axes)} of the input (shape "
            f"{inputs.shape}) must have a known size to create the variables."
        )
    return [int(size) for size in shape]


def resolve_variance_estimator(estimator: str | None, fused_path: bool) -> str:
    """`None` means TF1's numbers: unbiased where TF1 took the fused kernel.

    Args:
        estimator: None, `"biased"` or `"unbiased"`.
        fused_path: Whether TF1 would have run `fused_batch_norm` here; its
            kernel returned (and TF1 stored) the Bessel-corrected variance,
            while the non-fused path stored the biased one.

    Returns:
        `"biased"` or `"unbiased"`.

    Raises:
        ValueError: For any other estimator.
    """
    if estimator is None:
        return "unbiased" if fused_path else "biased"
    if estimator not in arguments.VARIANCE_ESTIMATORS:
        raise ValueError(
            f"`moving_variance_estimator` must be None (TF1's numbers), "
            f"'biased' or 'unbiased'; received {estimator!r}."
        )
    return estimator


def _read_once(variables: GraphBNVariables) -> bn.MovingStatistics:
    """Every statistic's value, read by one op each.

    The forward pass and the update ops use these same tensors, so their
    reads precede the assignments; a second read in the same `Session.run`
    could see an update that already ran (renorm's forward reads the
    statistics it updates).
    """
    return bn.MovingStatistics(
        **{
            name: tf.convert_to_tensor(getattr(variables, name))
            for name in ("moving_mean", "moving_variance", *RENORM_VARIABLE_NAMES)
            if getattr(variables, name) is not None
        }
    )


def normalize(
    inputs: tf.Tensor,
    variables: GraphBNVariables,
    *,
    feature_axes: Sequence[int],
    epsilon: float,
    momentum: float,
    training,
    variance_estimator: str,
    fused_kernel: bool = True,
    batch_weights: tf.Tensor | None = None,
    virtual_batch_size: int | None = None,
    adjustment: Callable | None = None,
    renorm: Renorm | None = None,
) -> tuple[tf.Tensor, list[Update]]:
    """Builds the forward pass and the gated moving-statistics updates.

    Args:
        inputs: The input tensor (any float dtype; computed in float32).
        variables: The layer's variables (with the renorm ones for renorm).
        feature_axes: Sorted non-negative feature axes.
        epsilon: Added to the variance.
        momentum: Keras convention, `moving = momentum * moving + (1 -
            momentum) * batch` (TF1's `decay`).
        training: Python bool, 0/1, NumPy bool, or a scalar `tf.bool` tensor.
        variance_estimator: `"biased"` or `"unbiased"` moving variance.
        fused_kernel: Whether the fused kernel may run (`tfbn.nn.fused`: one
            feature axis, last or 1, rank 2 to 5, and none of the options
            below). A speed choice only: both paths give the same numbers
            within float32 rounding.
        batch_weights: Optional `[batch]` weights of the samples in the
            statistics (contrib's weighted moments).
        virtual_batch_size: Optional ghost-batch size (tf.layers' meaning).
        adjustment: Optional tf.layers `adjustment(shape) -> (scale, bias)`,
            called with the shape of the (ghost-batch view of the) input and
            applied to the normalized value in training only.
        renorm: Batch Renormalization settings, or None.

    Returns:
        `(outputs, updates)`: the float32 output, and `(variable, new_value)`
        pairs (`moving_mean`, `moving_variance`, then with renorm
        `moving_stddev`, `renorm_mean`, `renorm_stddev`); empty when
        `training` is statically False.
    """
    mode = resolve_training(training)
    x = tf.cast(inputs, tf.float32)
    statistics = _read_once(variables)
    use_fused_kernel = fused_kernel and (
        bn.fused_blocker(
            x.shape.rank,
            feature_axes,
            x.dtype,
            renorm=renorm is not None,
            virtual_batch_size=virtual_batch_size,
            masked=batch_weights is not None,
            adjustment=adjustment is not None,
        )
        is None
    )
    mask = None
    if batch_weights is not None:
        weights = tf.cast(batch_weights, tf.float32)
        mask = tf.reshape(weights, [-1] + [1] * (x.shape.rank - 1))
    outputs, batch = bn.normalize(
        x,
        None if variables.gamma is None else tf.convert_to_tensor(variables.gamma),
        None if variables.beta is None else tf.convert_to_tensor(variables.beta),
        statistics,
        feature_axes,
        epsilon,
        training_mode=mode,
        use_fused_kernel=use_fused_kernel,
        mask=mask,
        virtual_batch_size=virtual_batch_size,
        renorm_clipping=None if renorm is None else renorm.clipping,
        adjustment=adjustment,
    )
    if batch is None:
        return outputs, []
    rule = bn.UpdateRule(
        momentum=momentum,
        epsilon=epsilon,
        variance_estimator=variance_estimator,
        renorm_momentum=None if renorm is None else renorm.momentum,
    )
    new = bn.updated_statistics(statistics, batch, rule)
    return outputs, [(getattr(variables, name), value) for name, value in new.items()]


def _inside_control_flow_branch(graph) -> bool:
    """Whether ops are being built inside a cond/while branch of `graph`."""
    if graph._get_control_flow_context() is not None:  # TF1 control flow.
        return True
    # Control flow v2 builds each branch as a function graph of these types.
    return type(graph).__name__ in (
        "CondBranchFuncGraph",
        "WhileCondFuncGraph",
        "WhileBodyFuncGraph",
    )


def register_updates(
    updates: list[Update],
    outputs: tf.Tensor,
    updates_collections,
) -> tf.Tensor:
    """Creates one assign op per update and wires it up as TF1 did.

    Args:
        updates: `(variable, new_value)` pairs from `normalize`.
        outputs: The layer output.
        updates_collections: A collection name or list of names to add each
            assign op to, or None to make `outputs` depend on the updates.

    Returns:
        `outputs`, wrapped in an identity with the update control
        dependencies when `updates_collections` is None.

    Raises:
        ValueError: When the ops would go into a collection from inside a
            `tf.cond`/`tf.while_loop` branch, where nothing outside the branch
            can depend on them (TF1 dropped such updates silently).
    """
    if not updates:
        return outputs
    ops = []
    for index, (variable, value) in enumerate(updates):
        name = "AssignMovingAvg" if index == 0 else f"AssignMovingAvg_{index}"
        ops.append(variable.assign(value, name=name, read_value=False))
    if updates_collections is None:
        with tf.control_dependencies(ops):
            return tf.identity(outputs)
    graph = tf.compat.v1.get_default_graph()
    if _inside_control_flow_branch(graph):
        raise ValueError(
            "A training-mode batch norm inside a tf.cond/tf.while_loop branch "
            "cannot put its update ops into a collection: ops outside the "
            "branch cannot depend on them. Pass updates_collections=None "
            "(the output then forces the update), or build the layer outside "
            "the branch."
        )
    names = (
        [updates_collections] if isinstance(updates_collections, str) else list(updates_collections)
    )
    for op in ops:
        for collection in names:
            graph.add_to_collection(collection, op)
    return outputs
