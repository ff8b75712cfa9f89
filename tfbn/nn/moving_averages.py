"""How a batch statistic is folded into a moving statistic.

Shared by the Keras layer and `tfbn.compat.v1` so both produce the same bits.
"""

from __future__ import annotations

import tensorflow as tf


def exponential_moving_average(moving, batch, momentum: float):
    """Keras' momentum convention: `moving * momentum + batch * (1 - momentum)`.

    The operand order is the stock Keras layer's, so moving statistics agree
    with it to the last bit for the same batch statistics. PyTorch's
    `momentum=0.1` is Keras' `momentum=0.9`.
    """
    return moving * momentum + batch * (1.0 - momentum)


def cumulative_average(moving, batch, num_batches):
    """The exact running mean of all batch statistics seen so far.

    Args:
        moving: The average over the previous `num_batches` batches.
        batch: The new batch statistic.
        num_batches: How many batches `moving` already averages (any dtype).

    Returns:
        The average over `num_batches + 1` batches, computed incrementally so
        it stays accurate over millions of batches.
    """
    seen = tf.cast(num_batches, batch.dtype) + 1.0
    return moving + (batch - moving) / seen


def update_moving_statistic(moving, batch, momentum: float | None, num_batches=None):
    """Dispatches between the exponential (float momentum) and cumulative (None) rules."""
    if momentum is None:
        return cumulative_average(moving, batch, num_batches)
    return exponential_moving_average(moving, batch, momentum)
