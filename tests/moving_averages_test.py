"""Tests for tfbn.moving_averages against hand-computed sequences."""

import numpy as np
import tensorflow as tf

from tfbn.nn import moving_averages


def test_exponential_moving_average_keras_convention():
    # From (0, 1) with momentum 0.9 and one batch of mean m, variance v.
    m, v = 5.0, 4.0
    mean = moving_averages.exponential_moving_average(tf.constant(0.0), tf.constant(m), 0.9)
    var = moving_averages.exponential_moving_average(tf.constant(1.0), tf.constant(v), 0.9)
    np.testing.assert_allclose([mean.numpy(), var.numpy()], [0.1 * m, 0.9 + 0.1 * v], rtol=1e-7)


def test_cumulative_average_is_the_exact_mean_of_all_batches():
    batches = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    moving = tf.constant([7.0, 7.0, 7.0])  # the initial value is forgotten
    for seen, batch in enumerate(batches):
        moving = moving_averages.cumulative_average(
            moving, tf.constant(batch), tf.constant(seen, tf.int64)
        )
    np.testing.assert_allclose(moving.numpy(), batches.astype(np.float64).mean(0), rtol=1e-5)


def test_dispatch():
    old, new = tf.constant(1.0), tf.constant(3.0)
    assert moving_averages.update_moving_statistic(old, new, None, 1).numpy() == 2.0
    assert moving_averages.update_moving_statistic(old, new, 0.5, None).numpy() == 2.0
