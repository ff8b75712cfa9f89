"""Tests for tfbn.training_flag.resolve_training."""

import numpy as np
import pytest
import tensorflow as tf

from tfbn.nn.training_flag import resolve_training


@pytest.mark.parametrize(
    "flag, expected",
    [
        (None, False),
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        (np.bool_(True), True),
        (np.int64(0), False),
    ],
)
def test_python_and_numpy_flags(flag, expected):
    assert resolve_training(flag) is expected


def test_constant_tensors_are_folded_to_python_bools():
    assert resolve_training(tf.constant(True)) is True
    assert resolve_training(tf.constant(False)) is False


def test_unknown_tensor_is_returned_as_is():
    seen = []

    @tf.function(input_signature=[tf.TensorSpec([], tf.bool)])
    def trace(flag):
        seen.append(resolve_training(flag))
        return flag

    trace(tf.constant(True))
    assert tf.is_tensor(seen[0])


@pytest.mark.parametrize("flag", [2, -1, "yes", 0.5, [True]])
def test_ambiguous_values_are_rejected(flag):
    with pytest.raises(TypeError, match="training"):
        resolve_training(flag)


def test_non_bool_and_non_scalar_tensors_are_rejected():
    with pytest.raises(TypeError, match="tf.bool"):
        resolve_training(tf.constant(1))
    with pytest.raises(ValueError, match="scalar"):
        resolve_training(tf.constant([True, False]))
