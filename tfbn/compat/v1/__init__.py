"""Graph-mode batch normalization for `tf.compat.v1` code on TF 2.21 / Keras 3.

Replaces `tf.compat.v1.layers.batch_normalization` and
`tf.contrib.layers.batch_norm` (both gone under Keras 3) with the same
arguments, variable names and `UPDATE_OPS` contract, plus the train-op
wiring TF1 left to the user:

    y = tfbn.compat.v1.batch_norm(x, decay=0.9, is_training=is_training)
    ...
    train_op = tfbn.compat.v1.minimize_with_updates(
        optimizer, loss, var_list="model/head", update_scope="model/head")
    # or, with clipped gradients:
    train_op = tfbn.compat.v1.apply_gradients_with_updates(
        optimizer, clipped_grads_and_vars, update_scope="model/head")

`batch_norm` also takes its defaults from `tf_slim.arg_scope` (under
`slim.batch_norm`'s entry) when tf_slim is installed; tfbn never imports it.

Nothing here imports `tf_keras` or touches `tf.compat.v1.layers`.
"""

from tfbn.compat.v1.contrib_api import batch_norm
from tfbn.compat.v1.layers_api import batch_normalization
from tfbn.compat.v1.update_ops import (
    MissingUpdateDependenciesError,
    apply_gradients_with_updates,
    check_update_dependencies,
    minimize_with_updates,
)

__all__ = [
    "MissingUpdateDependenciesError",
    "apply_gradients_with_updates",
    "batch_norm",
    "batch_normalization",
    "check_update_dependencies",
    "minimize_with_updates",
]
