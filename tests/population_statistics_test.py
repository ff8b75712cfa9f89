"""Tests for tfbn.tools.population_statistics against NumPy population statistics."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfbn
from tfbn.layers import introspection
from tfbn.tools import stored_statistics
from tfbn.tools.population_statistics import population_moments, recompute_statistics

L = keras.layers


def _batches(sizes, features=4, seed=0, loc=2.0, scale=3.0):
    rng = np.random.default_rng(seed)
    return [rng.normal(loc, scale, size=(n, features)).astype("float32") for n in sizes]


def _dense_numpy(layer, x):
    kernel, bias = (w.numpy().astype(np.float64) for w in layer.weights)
    return x.astype(np.float64) @ kernel + bias


def _bn_numpy(layer, x):
    """Inference-mode BN from the layer's weights, in float64."""
    gamma, beta, mean, variance = (w.numpy().astype(np.float64) for w in layer.weights[:4])
    return (x - mean) / np.sqrt(variance + layer.epsilon) * gamma + beta


@pytest.mark.parametrize(
    "make_bn, ddof",
    [
        (lambda: tfbn.BatchNormalization(), 0),
        (lambda: tfbn.BatchNormalization(moving_variance_estimator="unbiased"), 1),
        (lambda: L.BatchNormalization(momentum=0.999), 0),
    ],
)
def test_single_layer_matches_numpy_over_uneven_batches(make_bn, ddof):
    inputs = keras.Input((4,))
    dense = L.Dense(3)
    bn = make_bn()
    model = keras.Model(inputs, bn(dense(inputs)))
    batches = _batches([5, 7, 3])

    result = recompute_statistics(model, batches, progress=False)

    features = _dense_numpy(dense, np.concatenate(batches))
    np.testing.assert_allclose(bn.moving_mean.numpy(), features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), features.var(0, ddof=ddof), rtol=1e-5)
    np.testing.assert_allclose(result[bn.path].variance, features.var(0), rtol=1e-5)
    assert result[bn.path].num_calls == 3


def test_chain_sees_upstream_layers_new_statistics():
    inputs = keras.Input((4,))
    dense1, dense2 = L.Dense(3), L.Dense(2)
    bn1 = tfbn.BatchNormalization(gamma_initializer="random_uniform")
    bn2 = L.BatchNormalization()
    side = tfbn.BatchNormalization(name="side")  # Independent of bn1: first pass.
    model = keras.Model(inputs, [bn2(dense2(bn1(dense1(inputs)))), side(inputs)])
    batches = _batches([6, 6, 2], seed=1)
    data = np.concatenate(batches)

    recompute_statistics(model, tf.data.Dataset.from_tensor_slices(data).batch(6), progress=False)

    hidden = _dense_numpy(dense1, data)
    np.testing.assert_allclose(bn1.moving_mean.numpy(), hidden.mean(0), rtol=1e-5, atol=1e-6)
    second = _dense_numpy(dense2, _bn_numpy(bn1, hidden))
    np.testing.assert_allclose(bn2.moving_mean.numpy(), second.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn2.moving_variance.numpy(), second.var(0), rtol=1e-5)
    np.testing.assert_allclose(side.moving_variance.numpy(), data.var(0), rtol=1e-5)
    # The stored statistics now describe the inference model exactly.
    fresh = population_moments(model, batches)
    np.testing.assert_allclose(fresh[bn2.path].mean, bn2.moving_mean.numpy(), rtol=1e-5, atol=1e-5)


def test_channels_first_conv_nested_model_and_untouched_variables():
    inner_in = keras.Input((2, 5, 5))
    conv = L.Conv2D(3, 3, data_format="channels_first")
    renorm_bn = tfbn.BatchNormalization(axis=1, renorm=True, momentum=None)
    inner = keras.Model(inner_in, renorm_bn(conv(inner_in)), name="backbone")
    inputs = keras.Input((2, 5, 5))
    model = keras.Model(inputs, L.Flatten()(inner(inputs)))
    rng = np.random.default_rng(0)
    batches = [rng.normal(1.0, 2.0, (3, 2, 5, 5)).astype("float32") for _ in range(3)]
    before = {w.path: w.numpy().copy() for w in model.weights}

    recompute_statistics(model, batches, num_batches=2, progress=False)

    features = conv(np.concatenate(batches[:2])).numpy().astype(np.float64)
    variance = features.var((0, 2, 3))
    np.testing.assert_allclose(
        renorm_bn.moving_mean.numpy(), features.mean((0, 2, 3)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(renorm_bn.moving_variance.numpy(), variance, rtol=1e-5)
    np.testing.assert_allclose(
        renorm_bn.moving_stddev.numpy(), np.sqrt(variance + renorm_bn.epsilon), rtol=1e-5
    )
    assert int(renorm_bn.num_batches_tracked.numpy()) == 2
    # renorm_mean and renorm_stddev describe the same population now (checked
    # against NumPy in test_renorm_layers_get_every_statistic_consistent).
    changed = {
        "moving_mean",
        "moving_variance",
        "moving_stddev",
        "renorm_mean",
        "renorm_stddev",
        "num_batches_tracked",
    }
    assert set(introspection.statistic_variables(renorm_bn)) == changed
    for weight in model.weights:
        if weight.path.split("/")[-1] not in changed:
            assert np.array_equal(before[weight.path], weight.numpy()), weight.path


def test_masked_inputs_pool_only_unmasked_values():
    inputs = keras.Input((3, 2))
    masked = L.Masking(mask_value=0.0)(inputs)
    bn = tfbn.BatchNormalization()
    model = keras.Model(inputs, bn(masked))
    data = np.random.default_rng(2).normal(size=(4, 3, 2)).astype("float32")
    data[0, 1] = 0.0
    data[2, 0] = 0.0

    recompute_statistics(model, [data[:2], data[2:]], progress=False)

    kept = data.reshape(-1, 2)[np.any(data.reshape(-1, 2) != 0, axis=1)].astype(np.float64)
    np.testing.assert_allclose(bn.moving_mean.numpy(), kept.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), kept.var(0), rtol=1e-5)


def test_short_dataset_is_refused_before_any_change():
    inputs = keras.Input((4,))
    bn = tfbn.BatchNormalization()
    model = keras.Model(inputs, bn(inputs))
    with pytest.raises(ValueError, match="yielded only 3 batches"):
        recompute_statistics(model, _batches([2, 2, 2]), num_batches=4, progress=False)
    assert np.array_equal(bn.moving_mean.numpy(), np.zeros(4))
    assert np.array_equal(bn.moving_variance.numpy(), np.ones(4))


def test_bad_datasets_are_refused():
    inputs = keras.Input((4,))
    hidden = tfbn.BatchNormalization()(L.Dense(4)(tfbn.BatchNormalization()(inputs)))
    model = keras.Model(inputs, hidden)
    data = _batches([4])[0]
    with pytest.raises(TypeError, match="Batch it"):
        recompute_statistics(model, data, progress=False)
    with pytest.raises(ValueError, match="infinite"):
        recompute_statistics(model, tf.data.Dataset.from_tensors(data).repeat(), progress=False)
    with pytest.raises(TypeError, match="one-shot iterator"):
        recompute_statistics(model, iter([data, data]), progress=False)
    with pytest.raises(ValueError, match="num_batches"):
        recompute_statistics(model, [data], num_batches=0, progress=False)


def test_labelled_dataset_and_progress_bar(capsys):
    inputs = keras.Input((4,))
    bn = L.BatchNormalization()
    model = keras.Model(inputs, bn(inputs))
    data = _batches([8], seed=3)[0]
    labelled = tf.data.Dataset.from_tensor_slices((data, np.zeros(8))).batch(3)

    recompute_statistics(model, labelled, progress=True)

    assert "pass 1" in capsys.readouterr().out
    np.testing.assert_allclose(bn.moving_mean.numpy(), data.astype(np.float64).mean(0), rtol=1e-5)


def _renorm_reference(features, estimator, epsilon):
    """NumPy reference of every renorm statistic after a recompute (float64)."""
    mean = features.mean(0)
    variance = features.var(0, ddof=1 if estimator == "unbiased" else 0)
    stddev = np.sqrt(variance + epsilon)
    return {
        "moving_mean": mean,
        "moving_variance": variance,
        "moving_stddev": stddev,
        "renorm_mean": mean,
        "renorm_stddev": stddev,
    }


@pytest.mark.parametrize(
    "make_bn, estimator",
    [
        (lambda: tfbn.BatchNormalization(renorm=True, epsilon=0.01), "biased"),
        (
            lambda: tfbn.BatchNormalization(
                renorm=True, moving_variance_estimator="unbiased", momentum=None
            ),
            "unbiased",
        ),
        (lambda: L.BatchNormalization(renorm=True), "biased"),
    ],
)
def test_renorm_layers_get_every_statistic_consistent(make_bn, estimator):
    inputs = keras.Input((4,))
    dense = L.Dense(3)
    bn = make_bn()
    model = keras.Model(inputs, bn(dense(inputs)))
    batches = _batches([5, 4, 6, 2], seed=4)

    recompute_statistics(model, batches, progress=False)

    features = _dense_numpy(dense, np.concatenate(batches))
    expected = _renorm_reference(features, estimator, bn.epsilon)
    for name, value in expected.items():
        np.testing.assert_allclose(
            getattr(bn, name).numpy(), value, rtol=1e-5, atol=1e-6, err_msg=name
        )
    if bn.momentum is None:
        assert int(bn.num_batches_tracked.numpy()) == len(batches)
    # The layer's own rule derives the moving variance from the moving stddev;
    # after the recompute both agree.
    derived = np.maximum(bn.moving_stddev.numpy().astype(np.float64) ** 2 - bn.epsilon, 0)
    np.testing.assert_allclose(derived, bn.moving_variance.numpy(), rtol=1e-4, atol=1e-6)


def test_cumulative_average_continues_from_the_population():
    inputs = keras.Input((4,))
    bn = tfbn.BatchNormalization(momentum=None)
    model = keras.Model(inputs, bn(inputs))
    batches = _batches([4, 4, 4], seed=5)
    recompute_statistics(model, batches, progress=False)
    extra = _batches([4], seed=6)[0]

    bn(extra, training=True)

    # momentum=None averages batch means: the recompute counts as 3 batches.
    means = [b.astype(np.float64).mean(0) for b in batches]
    population_mean = np.concatenate(batches).astype(np.float64).mean(0)
    expected = (3 * population_mean + extra.astype(np.float64).mean(0)) / 4
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.mean(means, 0), population_mean, rtol=1e-6)
    assert int(bn.num_batches_tracked.numpy()) == 4


def test_unbiased_variance_of_single_values_is_refused():
    inputs = keras.Input((4,))
    bn = tfbn.BatchNormalization(moving_variance_estimator="unbiased")
    model = keras.Model(inputs, bn(inputs))
    with pytest.raises(ValueError, match="at least 2 values"):
        recompute_statistics(model, _batches([1]), progress=False)


def test_stored_variance_follows_the_estimator_in_float64():
    rng = np.random.default_rng(7)
    values = rng.normal(1e3, 1e-2, size=(9, 3))  # float64 precision matters here.
    biased = values.var(0)
    count = np.full(3, 9.0)
    np.testing.assert_array_equal(
        stored_statistics.stored_variance(biased, count, "biased"), biased
    )
    unbiased = stored_statistics.stored_variance(biased, count, "unbiased")
    assert unbiased.dtype == np.float64
    np.testing.assert_allclose(unbiased, values.var(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(
        stored_statistics.renorm_stddev(unbiased, 1e-3), np.sqrt(values.var(0, ddof=1) + 1e-3)
    )
    with pytest.raises(ValueError, match="`estimator`"):
        stored_statistics.stored_variance(biased, count, "bessel")
