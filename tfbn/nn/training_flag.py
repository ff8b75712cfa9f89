"""Normalises the many spellings of a `training` flag into one of three forms.

TF1 code passes placeholders, Keras passes Python booleans or None, and
ported code passes `0`/`1` or NumPy booleans. A misread flag is silent and
costly (batch statistics at inference, or no updates in training), so
anything that is not clearly a boolean is rejected.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

TrainingMode = bool | tf.Tensor


def resolve_training(training, argument_name: str = "training") -> TrainingMode:
    """Returns `True`, `False`, or a scalar `tf.bool` tensor whose value is unknown.

    Args:
        training: None (inference), a Python/NumPy bool, the integers 0 or 1,
            or a scalar boolean tensor (constant, placeholder or traced).
        argument_name: The name used in error messages.

    Returns:
        A Python bool when the value is known at trace time (constants are
        folded), otherwise the scalar `tf.bool` tensor.

    Raises:
        TypeError: For any other type, a non-bool tensor, or an int other than
            0 and 1.
        ValueError: For a tensor that is not a scalar.
    """
    if training is None:
        return False
    if isinstance(training, (bool, np.bool_)):
        return bool(training)
    if isinstance(training, (int, np.integer)):
        if training in (0, 1):
            return bool(training)
        raise TypeError(
            f"`{argument_name}` must be a boolean; received the integer "
            f"{training!r}. Pass True or False."
        )
    if tf.is_tensor(training):
        if training.dtype != tf.bool:
            raise TypeError(
                f"`{argument_name}` must be a tf.bool tensor; received dtype "
                f"{training.dtype.name}. Use tf.cast(flag, tf.bool)."
            )
        if training.shape.rank not in (None, 0):
            raise ValueError(
                f"`{argument_name}` must be a scalar; received shape "
                f"{training.shape}. Reduce it to one boolean first."
            )
        static = tf.get_static_value(training)
        if static is not None:
            return bool(static)
        return training
    raise TypeError(
        f"`{argument_name}` must be None, a bool, or a scalar tf.bool tensor; "
        f"received {training!r} of type {type(training).__name__}."
    )
