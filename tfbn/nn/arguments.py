"""Validation of batch-normalization hyperparameters, shared by every API.

`tfbn.BatchNormalization` and both `tfbn.compat.v1` functions accept the same
values for the same hyperparameters and reject the rest with the same
message: the argument's name, the value received and the fix.
"""

from __future__ import annotations

import math
import warnings

VARIANCE_ESTIMATORS = ("biased", "unbiased")


class Validated:
    """An attribute whose every assignment goes through `check(value)`.

    For layer settings that users change after construction (e.g.
    `layer.momentum = 0.9` to fine-tune), so that a bad value fails where it
    is set rather than as NaN statistics later.
    """

    def __init__(self, check):
        self._check = check

    def __set_name__(self, owner, name):
        self._slot = f"_checked_{name}"

    def __get__(self, instance, owner=None):
        return self if instance is None else getattr(instance, self._slot)

    def __set__(self, instance, value):
        setattr(instance, self._slot, self._check(value))


def _as_float(name: str, value) -> float:
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be a float; received the bool {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a float; received {value!r}.") from None


def momentum(value, name: str = "momentum", allow_none: bool = False) -> float | None:
    """Checks a moving-average momentum (Keras convention) and returns it as a float.

    Args:
        value: The momentum, `moving = momentum * moving + (1 - momentum) *
            batch`. 1.0 keeps the statistics frozen, 0.0 keeps the last batch.
        name: The argument name used in messages.
        allow_none: Whether None (a cumulative average) is allowed.

    Returns:
        The momentum as a float, or None.

    Raises:
        TypeError: For a value that is not a number.
        ValueError: For NaN, infinity or a value outside [0, 1].
    """
    if value is None and allow_none:
        return None
    number = _as_float(name, value)
    if not 0.0 <= number <= 1.0:  # False for NaN as well.
        hint = " (or None for a cumulative average)" if allow_none else ""
        raise ValueError(
            f"`{name}` must be in [0, 1]{hint}; received {value!r}. Keras' convention is "
            "moving = momentum * moving + (1 - momentum) * batch, so PyTorch's "
            "momentum=0.1 is 0.9 here."
        )
    return number


def epsilon(value, name: str = "epsilon") -> float:
    """Checks the variance epsilon: finite and >= 0 (0 is allowed, with a warning).

    Args:
        value: The constant added to the variance.
        name: The argument name used in messages.

    Returns:
        The epsilon as a float.

    Raises:
        TypeError: For a value that is not a number.
        ValueError: For a negative, NaN or infinite value.
    """
    number = _as_float(name, value)
    if not (math.isfinite(number) and number >= 0.0):
        raise ValueError(
            f"`{name}` must be a finite number >= 0; received {value!r}. It keeps "
            "1 / sqrt(variance + epsilon) finite; 1e-3 (Keras) or 1e-5 (TF1, PyTorch) "
            "are the usual values."
        )
    if number == 0.0:
        warnings.warn(
            f"`{name}`=0: a feature whose variance is 0 (a constant input) will be "
            "divided by zero and give NaN or infinity. Use a small positive epsilon "
            "such as 1e-5 unless the data rules that out.",
            stacklevel=3,
        )
    return number


def variance_estimator(value) -> str:
    """Checks `moving_variance_estimator`: `"biased"` or `"unbiased"`.

    Raises:
        ValueError: For any other value.
    """
    if value not in VARIANCE_ESTIMATORS:
        raise ValueError(
            f"`moving_variance_estimator` must be one of {VARIANCE_ESTIMATORS}; received {value!r}."
        )
    return value


def virtual_batch_size(value) -> int | None:
    """Checks a ghost-batch size: None or an int >= 2.

    Raises:
        TypeError: For a value that is not an int.
        ValueError: For an int below 2.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`virtual_batch_size` must be a positive int or None; received {value!r}.")
    if value < 2:
        raise ValueError(
            "`virtual_batch_size` must be >= 2 (a ghost batch of one sample has no "
            f"variance); received {value}."
        )
    return value


def axis_list(axis) -> list[int]:
    """`axis` (an int or a list of ints) as a list, before the input rank is known.

    Raises:
        TypeError: For anything but an int or a non-empty list/tuple of ints.
        ValueError: For duplicate entries.
    """
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


def feature_axes(axis, rank: int | None) -> list[int]:
    """The feature axes of an input of `rank`, sorted and non-negative.

    Args:
        axis: An int or a list of ints, negative ones counting from the end.
        rank: The input rank.

    Returns:
        The sorted non-negative feature axes.

    Raises:
        ValueError: For an unknown rank, an axis out of range, or two entries
            naming the same axis (e.g. `[1, -3]` of a rank-4 input).
    """
    axes = axis_list(axis)
    if rank is None:
        raise ValueError(
            "Batch normalization needs inputs of known rank; received a tensor of "
            "unknown rank. Give the input (or placeholder) a shape, e.g. [None, 32]."
        )
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(f"`axis`={axis!r} is out of range for inputs of rank {rank}.")
    normalized = sorted(a % rank for a in axes)
    if len(set(normalized)) != len(normalized):
        raise ValueError(
            f"`axis`={axis!r} names the same axis twice for inputs of rank {rank} "
            f"(it is {normalized} counted from 0); list each feature axis once."
        )
    return normalized
