"""Tests for tfbn.nn.arguments: the shared hyperparameter rules, seen through every API."""

import numpy as np
import pytest
import tensorflow as tf

import tfbn
from tfbn.nn import arguments

DUPLICATE = r"`axis`=\[1, -3\] names the same axis twice for inputs of rank 4 \(it is \[1, 1\]"


def test_feature_axes_normalizes_negative_axes_and_sorts():
    assert arguments.feature_axes([-1, 1], 4) == [1, 3]
    assert arguments.feature_axes(-3, 4) == [1]


def test_axes_that_coincide_after_normalization_are_refused_by_every_api():
    with pytest.raises(ValueError, match=DUPLICATE):
        arguments.feature_axes([1, -3], 4)
    layer = tfbn.BatchNormalization(axis=[1, -3])  # the rank is unknown until build
    with pytest.raises(ValueError, match=DUPLICATE):
        layer(np.ones((2, 3, 4, 5), np.float32), training=True)
    with tf.Graph().as_default(), pytest.raises(ValueError, match=DUPLICATE):
        tfbn.compat.v1.batch_normalization(tf.zeros([2, 3, 4, 5]), axis=[1, -3])


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_epsilon_is_refused(value):
    with pytest.raises(ValueError, match=r"`epsilon` must be a finite number >= 0"):
        arguments.epsilon(value)
