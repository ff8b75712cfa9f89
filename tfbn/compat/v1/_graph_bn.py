"""The graph-mode batch normalization shared by both `tfbn.compat.v1` styles.

`batch_normalization` (tf.layers style) and `batch_norm` (contrib/slim style)
differ in argument names, defaults, variable scopes and collections; the
computation is this module's. The batch statistics come from
`tfbn.moments.batch_moments` and the moving averages from
`tfbn.moving_averages`, so the numbers are those of `tfbn.BatchNormalization`.

Updates are returned as `(variable, new_value)` pairs, each new value already
gated with `tf.where(valid, new, old)`: when the training flag is a tensor fed
False (or the batch cannot be trusted) running the update op writes the old
value back, bit for bit. This is TF1's "momentum 1.0 when not training"
trick without the rounding of `old - (old - batch) * 0`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

from tfbn import moments as moments_lib
from tfbn import moving_averages
from tfbn.training_flag import resolve_training

VARIANCE_ESTIMATORS = ("biased", "unbiased")
# TF1's `tf.nn.fused_batch_norm` silently raised smaller epsilons to this
# (a cuDNN requirement), so fused-path numbers used it.
FUSED_MIN_EPSILON = 1.001e-5
# An update needs two values per feature; one value has no variance.
_MIN_VALUES_PER_FEATURE = 2

Update = Tuple[tf.Variable, tf.Tensor]


@dataclasses.dataclass(frozen=True)
class GraphBNVariables:
    """The variables of one graph-mode BN layer (gamma/beta None when disabled)."""

    gamma: Optional[tf.Variable]
    beta: Optional[tf.Variable]
    moving_mean: tf.Variable
    moving_variance: tf.Variable


def create_variables(
    param_shape: Sequence[int],
    *,
    scale: bool,
    center: bool,
    initializers: Dict[str, Optional[Callable]],
    regularizers: Dict[str, Optional[Callable]],
    constraints: Dict[str, Optional[Callable]],
    trainable: bool,
    collections: Dict[str, List[str]],
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

    Returns:
        A `GraphBNVariables` of float32 variables named `gamma`, `beta`,
        `moving_mean`, `moving_variance`, as TF1 named them.
    """
    defaults = {
        "gamma": tf.compat.v1.ones_initializer(),
        "beta": tf.compat.v1.zeros_initializer(),
        "moving_mean": tf.compat.v1.zeros_initializer(),
        "moving_variance": tf.compat.v1.ones_initializer(),
    }

    def variable(name, is_trainable):
        return tf.compat.v1.get_variable(
            name,
            shape=list(param_shape),
            dtype=tf.float32,
            initializer=initializers.get(name) or defaults[name],
            regularizer=regularizers.get(name),
            constraint=constraints.get(name),
            trainable=is_trainable,
            collections=collections.get(name),
        )

    return GraphBNVariables(
        gamma=variable("gamma", trainable) if scale else None,
        beta=variable("beta", trainable) if center else None,
        moving_mean=variable("moving_mean", False),
        moving_variance=variable("moving_variance", False),
    )


def feature_axes_for(rank: Optional[int], axis: Sequence[int]) -> List[int]:
    """Validates `axis` against the input rank; returns sorted non-negative axes."""
    if rank is None:
        raise ValueError(
            "Batch normalization needs inputs of known rank; received a tensor "
            "of unknown rank. Give the placeholder a shape, e.g. [None, 32]."
        )
    axes = []
    for a in axis:
        if not -rank <= a < rank:
            raise ValueError(
                f"`axis`={list(axis)!r} is out of range for inputs of rank {rank}."
            )
        axes.append(a % rank)
    if len(set(axes)) != len(axes):
        raise ValueError(f"`axis` has duplicate entries: {list(axis)!r}.")
    return sorted(axes)


def param_shape_for(inputs: tf.Tensor, feature_axes: Sequence[int]) -> List[int]:
    """The parameter shape; every feature axis must have a known size."""
    shape = [inputs.shape[a] for a in feature_axes]
    if any(size is None for size in shape):
        raise ValueError(
            f"Feature axes {list(feature_axes)} of the input (shape "
            f"{inputs.shape}) must have a known size to create the variables."
        )
    return [int(size) for size in shape]


def resolve_variance_estimator(estimator: Optional[str], fused_path: bool) -> str:
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
    if estimator not in VARIANCE_ESTIMATORS:
        raise ValueError(
            f"`moving_variance_estimator` must be None (TF1's numbers), "
            f"'biased' or 'unbiased'; received {estimator!r}."
        )
    return estimator


def _broadcast(value, rank: int, feature_axes: Sequence[int], param_shape):
    shape = [1] * rank
    for axis, size in zip(feature_axes, param_shape):
        shape[axis] = size
    return tf.reshape(value, shape)


def normalize(
    inputs: tf.Tensor,
    variables: GraphBNVariables,
    *,
    feature_axes: Sequence[int],
    epsilon: float,
    momentum: float,
    training,
    variance_estimator: str,
    batch_weights: Optional[tf.Tensor] = None,
    virtual_batch_size: Optional[int] = None,
    adjustment: Optional[Callable] = None,
) -> Tuple[tf.Tensor, List[Update]]:
    """Builds the forward pass and the gated moving-statistics updates.

    Args:
        inputs: The input tensor (any float dtype; computed in float32).
        variables: The layer's variables.
        feature_axes: Sorted non-negative feature axes.
        epsilon: Added to the variance.
        momentum: Keras convention, `moving = momentum * moving + (1 -
            momentum) * batch` (TF1's `decay`).
        training: Python bool, 0/1, NumPy bool, or a scalar `tf.bool` tensor.
        variance_estimator: `"biased"` or `"unbiased"` moving variance.
        batch_weights: Optional `[batch]` weights of the samples in the
            statistics (contrib's weighted moments).
        virtual_batch_size: Optional ghost-batch size (tf.layers' meaning).
        adjustment: Optional tf.layers `adjustment(shape) -> (scale, bias)`,
            applied to the normalized value in training only.

    Returns:
        `(outputs, updates)`: the float32 output, and `(variable, new_value)`
        pairs; empty when `training` is statically False.
    """
    mode = resolve_training(training)
    x = tf.cast(inputs, tf.float32)
    rank = x.shape.rank
    param_shape = variables.moving_mean.shape.as_list()

    def broadcast(value, target_rank=rank, axes=feature_axes):
        return _broadcast(value, target_rank, axes, param_shape)

    def affine():
        gamma = variables.gamma if variables.gamma is not None else tf.ones(param_shape)
        beta = variables.beta if variables.beta is not None else tf.zeros(param_shape)
        return tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta)

    def inference():
        gamma, beta = affine()
        a = gamma * tf.math.rsqrt(tf.convert_to_tensor(variables.moving_variance) + epsilon)
        b = beta - tf.convert_to_tensor(variables.moving_mean) * a
        return x * broadcast(a) + broadcast(b)

    def train():
        """Returns outputs, batch mean, batch variance, valid."""
        ghost = virtual_batch_size
        data, weights = x, None
        if batch_weights is not None:
            weights = tf.reshape(
                tf.cast(batch_weights, tf.float32), [-1] + [1] * (rank - 1)
            )
        offset = 0
        if ghost is not None:
            # tf.layers' ghost batches: view [N, ...] as [G, N // G, ...] and
            # keep axis 1, so ghost batch j holds samples j, j + N/G, ...
            batch = tf.shape(x)[0]
            data = tf.reshape(x, tf.concat([[ghost, batch // ghost], tf.shape(x)[1:]], 0))
            offset = 1
        axes = [a + offset for a in feature_axes]
        kept = set(axes) | ({1} if ghost is not None else set())
        reduction_axes = [a for a in range(rank + offset) if a not in kept]
        stats = moments_lib.batch_moments(data, reduction_axes, mask=weights)
        gamma, beta = affine()
        gamma = broadcast(gamma, rank + offset, axes)
        beta = broadcast(beta, rank + offset, axes)
        if adjustment is not None:
            adjust_scale, adjust_bias = adjustment(tf.shape(x))
            # tf.layers composed the adjustment inside gamma/beta.
            beta = beta + tf.cast(adjust_bias, tf.float32) * gamma
            gamma = gamma * tf.cast(adjust_scale, tf.float32)
        outputs = (data - stats.mean) * (gamma * tf.math.rsqrt(stats.variance + epsilon)) + beta
        mean, variance, count = stats.mean, stats.variance, stats.count
        if ghost is not None:
            outputs = tf.reshape(outputs, tf.shape(x))
            mean = tf.reduce_mean(mean, axis=1, keepdims=True)
            variance = tf.reduce_mean(variance, axis=1, keepdims=True)
        enough = count > 0 if weights is not None else count >= _MIN_VALUES_PER_FEATURE
        if variance_estimator == "unbiased":
            variance = moments_lib.bessel_corrected(variance, count)
        valid = tf.logical_and(
            tf.reduce_all(enough),
            tf.reduce_all(tf.math.is_finite(mean)) & tf.reduce_all(tf.math.is_finite(variance)),
        )
        return outputs, tf.reshape(mean, param_shape), tf.reshape(variance, param_shape), valid

    if mode is False:
        return inference(), []
    if mode is True:
        outputs, mean, variance, valid = train()
    else:
        outputs, mean, variance, valid = tf.cond(
            mode,
            train,
            lambda: (
                inference(),
                tf.zeros(param_shape),
                tf.zeros(param_shape),
                tf.constant(False),
            ),
        )

    def folded(variable, batch):
        old = tf.convert_to_tensor(variable)
        new = moving_averages.exponential_moving_average(old, batch, momentum)
        return tf.where(valid, new, old)

    updates = [
        (variables.moving_mean, folded(variables.moving_mean, mean)),
        (variables.moving_variance, folded(variables.moving_variance, variance)),
    ]
    return outputs, updates


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
    updates: List[Update],
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
    names = [updates_collections] if isinstance(updates_collections, str) else list(updates_collections)
    for op in ops:
        for collection in names:
            graph.add_to_collection(collection, op)
    return outputs
