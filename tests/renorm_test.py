"""Tests for `tfbn.renorm`: the Batch Renormalization correction and statistics."""

import numpy as np
import pytest
import tensorflow as tf

from tfbn.nn import renorm

EPSILON = 1e-3


def _values(seed, size=6):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(1.0, 2.0, size).astype(np.float32),
        rng.uniform(0.0, 9.0, size).astype(np.float32),
    )


@pytest.mark.parametrize(
    "clipping",
    [{}, {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}, {"rmax": 2.0}, {"dmax": 0.1, "rmin": None}],
)
def test_correction_matches_numpy(clipping):
    mean, variance = _values(0)
    renorm_mean, renorm_variance = _values(1)
    renorm_stddev = np.sqrt(renorm_variance)
    renorm_stddev[0] = 1e-4  # below sqrt(epsilon): the floor applies.
    r, d = renorm.correction(
        tf.constant(mean),
        tf.constant(variance),
        tf.constant(renorm_mean),
        tf.constant(renorm_stddev),
        EPSILON,
        clipping,
    )
    floor = np.maximum(renorm_stddev.astype(np.float64), np.sqrt(EPSILON))
    want_r = np.sqrt(variance.astype(np.float64) + EPSILON) / floor
    want_d = (mean.astype(np.float64) - renorm_mean) / floor
    if clipping.get("rmin") is not None:
        want_r = np.maximum(want_r, clipping["rmin"])
    if clipping.get("rmax") is not None:
        want_r = np.minimum(want_r, clipping["rmax"])
    if clipping.get("dmax") is not None:
        want_d = np.clip(want_d, -clipping["dmax"], clipping["dmax"])
    np.testing.assert_allclose(r.numpy(), want_r, rtol=1e-6)
    np.testing.assert_allclose(d.numpy(), want_d, rtol=1e-6, atol=1e-7)


def test_correction_is_a_constant_for_the_gradient():
    mean, variance = (tf.Variable(v) for v in _values(2))
    with tf.GradientTape() as tape:
        r, d = renorm.correction(mean, variance, tf.zeros(6), tf.ones(6), EPSILON, {})
        total = tf.reduce_sum(r) + tf.reduce_sum(d)
    assert tape.gradient(total, [mean, variance]) == [None, None]


def _old_statistics():
    stddev = np.array([1.0, 2.0, 0.5], np.float32)
    return renorm.RenormStatistics(
        moving_stddev=tf.constant(stddev),
        # Deliberately not relu(stddev^2 - eps): a skipped update must keep it.
        moving_variance=tf.constant([0.3, 0.2, 0.1]),
        renorm_mean=tf.constant([0.5, -1.0, 2.0]),
        renorm_stddev=tf.constant([1.5, 1.0, 0.25]),
    )


@pytest.mark.parametrize("momentum, num_batches", [(0.9, None), (None, 3)])
def test_updated_statistics_follow_the_moving_average_formulas(momentum, num_batches):
    old = _old_statistics()
    mean = np.array([1.0, 0.0, -2.0], np.float32)
    variance = np.array([4.0, 0.25, 9.0], np.float32)
    new = renorm.updated_statistics(
        old,
        tf.constant(mean),
        tf.constant(variance),
        epsilon=EPSILON,
        momentum=momentum,
        renorm_momentum=0.8,
        valid=tf.constant(True),
        num_batches=None if num_batches is None else tf.constant(num_batches, tf.int64),
    )
    stddev = np.sqrt(variance.astype(np.float64) + EPSILON)
    old_stddev = old.moving_stddev.numpy().astype(np.float64)
    if momentum is None:  # The running mean of num_batches + 1 stddevs.
        want_stddev = (old_stddev * num_batches + stddev) / (num_batches + 1)
    else:
        want_stddev = momentum * old_stddev + (1 - momentum) * stddev
    np.testing.assert_allclose(new.moving_stddev.numpy(), want_stddev, rtol=1e-6)
    np.testing.assert_allclose(
        new.moving_variance.numpy(), np.maximum(want_stddev**2 - EPSILON, 0.0), rtol=1e-6
    )
    np.testing.assert_allclose(
        new.renorm_mean.numpy(), 0.8 * old.renorm_mean.numpy() + 0.2 * mean, rtol=1e-6
    )
    np.testing.assert_allclose(
        new.renorm_stddev.numpy(), 0.8 * old.renorm_stddev.numpy() + 0.2 * stddev, rtol=1e-6
    )


def test_invalid_batch_leaves_every_statistic_bit_identical():
    old = _old_statistics()
    new = renorm.updated_statistics(
        old,
        tf.constant([9.0, 9.0, 9.0]),
        tf.constant([np.nan, 1.0, 1.0]),
        epsilon=EPSILON,
        momentum=0.5,
        renorm_momentum=0.5,
        valid=tf.constant(False),
    )
    for name in ("moving_stddev", "moving_variance", "renorm_mean", "renorm_stddev"):
        assert np.array_equal(getattr(new, name).numpy(), getattr(old, name).numpy()), name


@pytest.mark.parametrize(
    "clipping, match",
    [
        ({"rmx": 2.0}, "unknown keys"),
        ({"rmin": 2.0, "rmax": 1.0}, "rmax >= rmin"),
        ({"dmax": -1.0}, "dmax >= 0"),
    ],
)
def test_validate_clipping_rejects_bad_dicts(clipping, match):
    with pytest.raises(ValueError, match=match):
        renorm.validate_clipping(clipping)


def test_validate_clipping_copies():
    clipping = {"rmax": 3.0}
    validated = renorm.validate_clipping(clipping)
    assert validated == clipping and validated is not clipping
    assert renorm.validate_clipping(None) == {}
