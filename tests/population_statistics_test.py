"""Tests for tfbn.tools.population_statistics against NumPy population statistics."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfbn
from tfbn.layers import introspection
from tfbn.tools import population_statistics, stored_statistics
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


@pytest.mark.parametrize("make_bn", [tfbn.BatchNormalization, L.BatchNormalization])
def test_masked_inputs_with_features_on_axis_1_follow_the_keras_mask_convention(make_bn):
    # The mask drops timesteps (axis 1), and axis 1 holds the features: the
    # layers expand a Keras mask at the last axis, so each feature pools the
    # values of its row that the mask keeps, over the batch and the last axis.
    inputs = keras.Input((3, 2))
    masked = L.Masking(mask_value=0.0)(inputs)
    bn = make_bn(axis=1)
    model = keras.Model(inputs, bn(masked))
    data = np.random.default_rng(3).normal(size=(4, 3, 2)).astype("float32")
    data[0, 1] = 0.0
    data[2, 0] = 0.0

    recompute_statistics(model, [data[:2], data[2:]], progress=False)

    keep = np.any(data != 0, axis=2)  # [batch, time]: the Keras mask
    values = [data[:, t][keep[:, t]].reshape(-1).astype(np.float64) for t in range(3)]
    np.testing.assert_allclose(bn.moving_mean.numpy(), [v.mean() for v in values], rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), [v.var() for v in values], rtol=1e-5)


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

    output = capsys.readouterr().out
    # One bar counting the 3 batches, not one bar per dependency level.
    assert "1 rounds" in output and "3/3" in output and "/batch" in output
    assert "pass " not in output
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


def _residual_model():
    """Three BN levels; the first BN's output skips the second (a residual)."""
    inputs = keras.Input((4,))
    dense1, dense2, dense3 = L.Dense(5), L.Dense(5), L.Dense(3)
    bn1 = tfbn.BatchNormalization(gamma_initializer="random_uniform", name="bn1")
    bn2 = L.BatchNormalization(beta_initializer="random_normal", name="bn2")
    bn3 = tfbn.BatchNormalization(name="bn3")
    first = bn1(dense1(inputs))
    hidden = L.Add()([L.ReLU()(bn2(dense2(L.ReLU()(first)))), first])
    model = keras.Model(inputs, bn3(dense3(hidden)))
    return model, (dense1, dense2, dense3), (bn1, bn2, bn3)


def _statistics_snapshot(model):
    return {
        f"{layer.path}/{name}": variable.numpy().copy()
        for layer in introspection.batch_norm_layers(model)
        for name, variable in introspection.statistic_variables(layer).items()
    }


def test_residual_chain_matches_numpy_level_by_level():
    model, (dense1, dense2, dense3), (bn1, bn2, bn3) = _residual_model()
    batches = _batches([6, 6, 5], seed=8)
    data = np.concatenate(batches).astype(np.float64)

    recompute_statistics(model, batches, progress=False)

    first = _bn_numpy(bn1, _dense_numpy(dense1, data))
    second = _dense_numpy(dense2, np.maximum(first, 0))
    hidden = np.maximum(_bn_numpy(bn2, second), 0) + first
    third = _dense_numpy(dense3, hidden)
    for bn, features in ((bn2, second), (bn3, third)):
        np.testing.assert_allclose(bn.moving_mean.numpy(), features.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bn.moving_variance.numpy(), features.var(0), rtol=1e-4)


def test_recomputing_activations_instead_of_caching_gives_identical_statistics():
    cached, _, _ = _residual_model()
    replayed = keras.models.clone_model(cached)
    replayed.set_weights(cached.get_weights())
    dataset = tf.data.Dataset.from_tensor_slices(np.concatenate(_batches([7, 7], seed=9))).batch(4)

    recompute_statistics(cached, dataset, progress=False)
    recompute_statistics(replayed, dataset, progress=False, max_cache_bytes=0)

    expected, actual = _statistics_snapshot(cached), _statistics_snapshot(replayed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert np.array_equal(expected[name], actual[name]), name


class _Subclassed(keras.Model):
    """No Functional graph: the statistics come from whole passes over the data."""

    def __init__(self):
        super().__init__()
        self.dense = L.Dense(3)
        self.bn1 = tfbn.BatchNormalization()
        self.bn2 = L.BatchNormalization()

    def call(self, inputs, training=None):
        return self.bn2(self.dense(self.bn1(inputs, training=training)), training=training)


def test_subclassed_model_gets_the_same_level_by_level_statistics():
    model = _Subclassed()
    batches = _batches([5, 4], seed=10)
    model(batches[0])

    recompute_statistics(model, batches, progress=False)

    data = np.concatenate(batches).astype(np.float64)
    hidden = _dense_numpy(model.dense, _bn_numpy(model.bn1, data))
    np.testing.assert_allclose(model.bn1.moving_mean.numpy(), data.mean(0), rtol=1e-5)
    np.testing.assert_allclose(model.bn2.moving_variance.numpy(), hidden.var(0), rtol=1e-4)


def test_non_finite_batch_is_refused_naming_it_and_nothing_changes():
    model, _, _ = _residual_model()
    batches = _batches([4, 4, 4], seed=11)
    batches[1][2, 3] = np.nan
    before = _statistics_snapshot(model)

    with pytest.raises(ValueError, match=r"Batch 1 \(counting from 0\)"):
        recompute_statistics(model, batches, progress=False)

    after = _statistics_snapshot(model)
    assert all(np.array_equal(before[name], after[name]) for name in before)


def test_non_finite_statistics_of_a_later_layer_undo_the_earlier_layers():
    inputs = keras.Input((4,))
    bn1 = tfbn.BatchNormalization(name="bn1")
    huge = L.Dense(4, kernel_initializer=keras.initializers.Constant(1e30), name="huge")
    bn2 = tfbn.BatchNormalization(name="bn2")
    model = keras.Model(inputs, bn2(huge(bn1(inputs))))
    batches = _batches([4, 4], seed=12)
    before = _statistics_snapshot(model)

    # bn1 is assigned first; bn2's input overflows float32 once bn1 normalizes.
    with pytest.raises(ValueError, match="'bn2'.*NaN or infinite"):
        recompute_statistics(model, batches, progress=False)

    after = _statistics_snapshot(model)
    assert all(np.array_equal(before[name], after[name]) for name in before)


def test_stacked_batches_give_the_statistics_of_batch_by_batch_rounds(monkeypatch):
    """Runs of equally shaped batches share one call per round; nothing else changes."""
    inputs = keras.Input((3, 4))
    masked = L.Masking(mask_value=0.0)(inputs)
    hidden = tfbn.BatchNormalization(name="bn1")(L.Dense(4)(masked))
    outputs = L.BatchNormalization(name="bn2")(L.Dense(2)(L.ReLU()(hidden)))
    one_by_one = keras.Model(inputs, outputs)
    stacked = keras.models.clone_model(one_by_one)
    stacked.set_weights(one_by_one.get_weights())
    data = np.random.default_rng(13).normal(size=(14, 3, 4)).astype("float32")
    data[1, 2] = 0.0
    data[9, 0] = 0.0
    batches = [data[0:4], data[4:8], data[8:12], data[12:]]  # A run of 3, then 1.

    recompute_statistics(one_by_one, batches, progress=False)
    monkeypatch.setattr(population_statistics, "_MIN_STACK", 2)
    recompute_statistics(stacked, batches, progress=False)

    expected, actual = _statistics_snapshot(one_by_one), _statistics_snapshot(stacked)
    for name in expected:
        assert np.array_equal(expected[name], actual[name]), name
    kept = data.reshape(-1, 4)[np.any(data.reshape(-1, 4) != 0, axis=1)].astype(np.float64)
    dense = one_by_one.layers[2]
    features = _dense_numpy(dense, kept)
    bn1 = one_by_one.get_layer("bn1")
    np.testing.assert_allclose(bn1.moving_mean.numpy(), features.mean(0), rtol=1e-5, atol=1e-6)


def test_shared_batch_norm_pools_every_call_and_quiet_progress(capsys):
    inputs = keras.Input((4,))
    dense1, dense2 = L.Dense(3), L.Dense(3)
    shared = tfbn.BatchNormalization(name="shared")
    model = keras.Model(inputs, L.Add()([shared(dense1(inputs)), shared(dense2(inputs))]))
    batches = _batches([5, 3], seed=14)

    result = recompute_statistics(model, batches, progress=False)

    data = np.concatenate(batches)
    features = np.concatenate([_dense_numpy(dense1, data), _dense_numpy(dense2, data)])
    np.testing.assert_allclose(shared.moving_mean.numpy(), features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shared.moving_variance.numpy(), features.var(0), rtol=1e-5)
    assert result[shared.path].num_calls == 4  # Two calls on each of two batches.
    assert capsys.readouterr().out == ""


def test_shared_batch_norm_at_two_depths_pools_both_calls():
    inputs = keras.Input((4,))
    dense1, dense2, dense3 = L.Dense(3), L.Dense(3), L.Dense(3)
    first = tfbn.BatchNormalization(gamma_initializer="random_uniform", name="first")
    shared = L.BatchNormalization(name="shared")
    # The second call of `shared` depends on `first`; the first call does not.
    outputs = L.Add()([shared(dense1(inputs)), shared(dense3(first(dense2(inputs))))])
    model = keras.Model(inputs, outputs)
    batches = _batches([6, 5], seed=15)

    result = recompute_statistics(model, batches, progress=False)

    data = np.concatenate(batches)
    deep = _dense_numpy(dense3, _bn_numpy(first, _dense_numpy(dense2, data)))
    features = np.concatenate([_dense_numpy(dense1, data), deep])
    np.testing.assert_allclose(shared.moving_mean.numpy(), features.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(shared.moving_variance.numpy(), features.var(0), rtol=1e-4)
    assert result[shared.path].num_calls == 4


def test_cache_holding_only_some_batches_gives_identical_statistics():
    cached, _, _ = _residual_model()
    partly = keras.models.clone_model(cached)
    partly.set_weights(cached.get_weights())
    batches = _batches([4, 4, 4, 3], seed=16)

    recompute_statistics(cached, batches, progress=False)
    # Two batches' activations (4 x 5 float32 each) fit; the others are replayed.
    recompute_statistics(partly, batches, progress=False, max_cache_bytes=2 * 4 * 5 * 4)

    expected, actual = _statistics_snapshot(cached), _statistics_snapshot(partly)
    for name in expected:
        assert np.array_equal(expected[name], actual[name]), name


def test_a_second_call_with_other_shapes_and_dtypes_reuses_nothing_stale():
    inputs = keras.Input((None, 2))  # Any length: the rounds see new shapes.
    bn1 = tfbn.BatchNormalization(name="bn1")
    bn2 = L.BatchNormalization(name="bn2")
    model = keras.Model(inputs, bn2(L.Dense(3)(bn1(inputs))))
    rng = np.random.default_rng(17)
    short = [rng.normal(size=(3, 4, 2)).astype("float32") for _ in range(2)]
    long = [rng.normal(3.0, 2.0, size=(2, 6, 2)) for _ in range(2)]  # float64 this time.

    recompute_statistics(model, short, progress=False)
    recompute_statistics(model, long, progress=False)

    data = np.concatenate([batch.reshape(-1, 2) for batch in long])
    np.testing.assert_allclose(bn1.moving_mean.numpy(), data.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), data.var(0), rtol=1e-5)


def test_sequential_inside_functional_is_run_in_rounds():
    dense1, dense2 = L.Dense(3), L.Dense(2)
    bn1 = tfbn.BatchNormalization(beta_initializer="random_normal")
    bn2 = L.BatchNormalization()
    block = keras.Sequential([keras.Input((4,)), dense1, bn1, L.ReLU(), dense2, bn2])
    inputs = keras.Input((4,))
    model = keras.Model(inputs, block(inputs))
    batches = _batches([5, 5, 2], seed=18)

    recompute_statistics(model, batches, progress=False)

    assert len(model.__dict__["_tfbn_population_plan"][0].rounds) == 2
    data = np.concatenate(batches)
    second = _dense_numpy(dense2, np.maximum(_bn_numpy(bn1, _dense_numpy(dense1, data)), 0))
    np.testing.assert_allclose(bn2.moving_mean.numpy(), second.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn2.moving_variance.numpy(), second.var(0), rtol=1e-4)


@pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")
def test_multi_input_model_takes_dict_batches_and_refuses_a_single_array():
    first, second = keras.Input((3,), name="first"), keras.Input((3,), name="second")
    bn = tfbn.BatchNormalization()
    model = keras.Model([first, second], bn(L.Add()([first, second])))
    rng = np.random.default_rng(19)
    pairs = [(rng.normal(size=(4, 3)), rng.normal(size=(4, 3))) for _ in range(2)]

    recompute_statistics(model, [{"first": a, "second": b} for a, b in pairs], progress=False)

    total = np.concatenate([a + b for a, b in pairs])
    np.testing.assert_allclose(bn.moving_variance.numpy(), total.var(0), rtol=1e-5)
    before = bn.moving_mean.numpy().copy()
    with pytest.raises(ValueError, match="takes 2 inputs"):
        recompute_statistics(model, [a for a, _ in pairs], progress=False)
    assert np.array_equal(before, bn.moving_mean.numpy())
