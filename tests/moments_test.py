"""Tests for tfbn.moments against float64 NumPy."""

import numpy as np
import pytest
import tensorflow as tf

from tfbn.nn import moments


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e5, 1e6])
def test_variance_is_accurate_for_large_offsets(offset):
    rng = np.random.default_rng(0)
    x = (offset + rng.standard_normal((64, 8, 8, 4))).astype(np.float32)
    stats = moments.batch_moments(tf.constant(x), [0, 1, 2])
    reference = x.astype(np.float64).var(axis=(0, 1, 2))
    variance = stats.variance.numpy().reshape(-1)
    assert np.all(variance >= 0)
    np.testing.assert_allclose(variance, reference, rtol=2e-3)
    np.testing.assert_allclose(
        stats.mean.numpy().reshape(-1),
        x.astype(np.float64).mean(axis=(0, 1, 2)),
        rtol=1e-7,
        atol=1e-5,
    )


def test_constant_input_has_exactly_zero_variance():
    x = tf.fill([16, 5, 3], 123456.0)
    stats = moments.batch_moments(x, [0, 1])
    assert np.array_equal(stats.variance.numpy(), np.zeros((1, 1, 3), np.float32))
    assert np.array_equal(stats.mean.numpy(), np.full((1, 1, 3), 123456.0, np.float32))


def test_xla_agrees_with_eager():
    rng = np.random.default_rng(1)
    x = tf.constant((1e5 + rng.standard_normal((32, 6, 6, 3))).astype(np.float32))
    compiled = tf.function(lambda t: moments.batch_moments(t, [0, 1, 2]).variance, jit_compile=True)
    np.testing.assert_allclose(
        compiled(x).numpy(), moments.batch_moments(x, [0, 1, 2]).variance.numpy(), rtol=1e-3
    )


def test_mask_weights_the_statistics():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 5, 3)).astype(np.float32)
    mask = rng.random((4, 5, 1)) > 0.4
    stats = moments.batch_moments(tf.constant(x), [0, 1], mask=tf.constant(mask))
    kept = x[np.broadcast_to(mask, x.shape)].reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(stats.mean.numpy().reshape(-1), kept.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.variance.numpy().reshape(-1), kept.var(0), rtol=1e-5)
    np.testing.assert_array_equal(stats.count.numpy().reshape(-1), [mask.sum()] * 3)


def test_empty_and_fully_masked_batches_report_zero_count_and_finite_values():
    empty = moments.batch_moments(tf.zeros([0, 3]), [0])
    assert empty.count.numpy() == 0
    assert np.all(np.isfinite(empty.mean.numpy())) and np.all(np.isfinite(empty.variance.numpy()))
    masked = moments.batch_moments(tf.ones([4, 3]), [0], mask=tf.zeros([4, 1]))
    assert np.all(masked.count.numpy() == 0)
    assert np.all(np.isfinite(masked.variance.numpy()))


def test_bessel_correction():
    corrected = moments.bessel_corrected(tf.constant([1.25]), tf.constant(4.0))
    np.testing.assert_allclose(corrected.numpy(), [1.25 * 4 / 3], rtol=1e-7)
    # n = 1: the correction is undefined and the biased value comes back.
    assert moments.bessel_corrected(tf.constant([0.0]), tf.constant(1.0)).numpy()[0] == 0.0


def test_synchronized_statistics_equal_the_global_batch(two_cpu_strategy):
    strategy = two_cpu_strategy
    rng = np.random.default_rng(3)
    shards = [
        (1e4 + rng.normal(0, 1, (6, 3))).astype(np.float32),
        (1e4 + rng.normal(4, 2, (10, 3))).astype(np.float32),
    ]

    def replica_fn():
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        x = tf.where(replica == 0, tf.pad(shards[0], [[0, 4], [0, 0]]), shards[1])
        mask = tf.where(
            replica == 0, tf.concat([tf.ones([6, 1]), tf.zeros([4, 1])], 0), tf.ones([10, 1])
        )
        stats = moments.batch_moments(x, [0], mask=mask, synchronized=True)
        return stats.mean, stats.variance, stats.count

    results = strategy.run(tf.function(replica_fn))
    reference = np.concatenate(shards).astype(np.float64)
    for mean, variance, count in zip(*(strategy.experimental_local_results(r) for r in results)):
        np.testing.assert_allclose(mean.numpy().reshape(-1), reference.mean(0), rtol=1e-7)
        np.testing.assert_allclose(variance.numpy().reshape(-1), reference.var(0), rtol=1e-4)
        assert np.all(count.numpy() == 16)
