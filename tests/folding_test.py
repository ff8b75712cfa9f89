"""Tests for tfbn.tools.folding: folded models reproduce the original's inference."""

import os

import keras
import numpy as np
import pytest

import tfbn
from tfbn.tools.folding import ChannelAffine, FoldDecision, fold_batch_norm, fold_reason_counts
from tfbn.tools.model_graph import FOLD_BLOCKER_CODES

L = keras.layers


def _randomize(model, seed=0):
    """Non-trivial weights everywhere, positive variances and scales."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        name = weight.path.split("/")[-1]
        if name in ("moving_variance", "gamma"):
            weight.assign(rng.uniform(0.5, 2.0, weight.shape).astype("float32"))
        else:
            weight.assign(rng.normal(0.0, 0.5, weight.shape).astype("float32"))


def _bn_count(model):
    bn_types = (tfbn.BatchNormalization, L.BatchNormalization)
    return sum(isinstance(layer, bn_types) for layer in model._flatten_layers())


def _assert_same_inference(original, folded, data):
    expected = original(data, training=False).numpy()
    actual = folded(data, training=False).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


_CASES = {
    "conv1d": ((6, 3), lambda: L.Conv1D(4, 3, use_bias=False), -1),
    "conv2d_channels_first": (
        (3, 5, 5),
        lambda: L.Conv2D(4, 3, data_format="channels_first"),
        1,
    ),
    "conv3d": ((4, 4, 4, 2), lambda: L.Conv3D(3, 2), -1),
    "depthwise": ((5, 5, 3), lambda: L.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False), -1),
    "separable": ((5, 5, 3), lambda: L.SeparableConv2D(4, 3, depth_multiplier=2), -1),
    "dense_rank3": ((2, 5), lambda: L.Dense(3, use_bias=False), -1),
}


@pytest.mark.parametrize("case", sorted(_CASES))
@pytest.mark.parametrize("bn_type", [tfbn.BatchNormalization, L.BatchNormalization])
def test_foldable_producers_disappear_and_outputs_match(case, bn_type):
    shape, producer, axis = _CASES[case]
    inputs = keras.Input(shape)
    outputs = bn_type(axis=axis, name="bn")(producer()(inputs))
    model = keras.Model(inputs, outputs)
    _randomize(model)

    folded, decisions = fold_batch_norm(model, return_report=True)

    assert [(d.batch_norm, d.reason) for d in decisions] == [("bn", None)]
    assert _bn_count(folded) == 0
    assert not any(isinstance(layer, ChannelAffine) for layer in folded.layers)
    data = np.random.default_rng(1).normal(size=(2,) + shape).astype("float32")
    _assert_same_inference(model, folded, data)


def test_folded_dense_weights_follow_the_precomputed_scale_and_shift():
    inputs = keras.Input((4,))
    dense = L.Dense(3, name="dense")
    bn = tfbn.BatchNormalization(epsilon=1e-3)
    model = keras.Model(inputs, bn(dense(inputs)))
    _randomize(model)
    kernel, bias = (w.numpy().astype(np.float64) for w in dense.weights)
    gamma, beta, mean, variance = (w.numpy().astype(np.float64) for w in bn.weights)

    folded = fold_batch_norm(model)

    scale = gamma / np.sqrt(variance + 1e-3)
    new_kernel, new_bias = folded.get_layer("dense").get_weights()
    np.testing.assert_allclose(new_kernel, kernel * scale, rtol=1e-6)
    np.testing.assert_allclose(new_bias, (bias - mean) * scale + beta, rtol=1e-6, atol=1e-7)


def test_unfoldable_batch_norms_become_affine_with_reasons():
    inputs = keras.Input((6, 6, 2))
    relu_conv = L.Conv2D(3, 3, activation="relu", name="relu_conv")(inputs)
    bn_after_relu = tfbn.BatchNormalization(name="bn_after_relu")(relu_conv)
    branch = L.Conv2D(3, 1, name="branch")(bn_after_relu)
    bn_branch = L.BatchNormalization(name="bn_branch")(branch)
    merged = L.Add()([branch, bn_branch])  # `branch` also feeds Add.
    bn_input = tfbn.BatchNormalization(name="bn_input")(inputs)
    model = keras.Model(inputs, [merged, bn_input])
    _randomize(model)

    folded, decisions = fold_batch_norm(model, return_report=True)

    reasons = {d.batch_norm: d.reason for d in decisions}
    assert "'relu'" in reasons["bn_after_relu"]
    assert "also feeds other layers" in reasons["bn_branch"]
    assert "not produced by a layer" in reasons["bn_input"]
    assert all(d.folded_into is None for d in decisions)
    codes = {d.batch_norm: d.reason_code for d in decisions}
    assert codes == {
        "bn_after_relu": "producer_activation",
        "bn_branch": "producer_output_reused",
        "bn_input": "no_producer_layer",
    }
    assert set(codes.values()) <= set(FOLD_BLOCKER_CODES)
    assert sorted(layer.name for layer in folded.layers if isinstance(layer, ChannelAffine)) == [
        "bn_after_relu",
        "bn_branch",
        "bn_input",
    ]
    data = np.random.default_rng(2).normal(size=(3, 6, 6, 2)).astype("float32")
    for expected, actual in zip(model(data, training=False), folded(data)):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_shared_layers_and_multi_axis_batch_norm_are_not_folded():
    inputs = keras.Input((3, 4))
    dense = L.Dense(4, name="shared_dense")
    shared_bn = tfbn.BatchNormalization(name="shared_bn")
    first = shared_bn(dense(inputs))
    second = shared_bn(dense(L.Dense(4)(inputs)))
    multi = tfbn.BatchNormalization(axis=[1, 2], name="multi")(L.Dense(4, name="d2")(inputs))
    model = keras.Model(inputs, [first, second, multi])
    _randomize(model)

    folded, decisions = fold_batch_norm(model, return_report=True)

    reasons = {d.batch_norm: d.reason for d in decisions}
    assert "shared (called 2 times)" in reasons["shared_bn"]
    assert "normalizes axes [1, 2]" in reasons["multi"]
    codes = {d.batch_norm: d.reason_code for d in decisions}
    assert codes == {"shared_bn": "shared_batch_norm", "multi": "axis_mismatch"}
    decisions.append(FoldDecision("extra", None, "...", "axis_mismatch"))
    assert fold_reason_counts(decisions) == {"axis_mismatch": 2, "shared_batch_norm": 1}
    data = np.random.default_rng(3).normal(size=(2, 3, 4)).astype("float32")
    for expected, actual in zip(model(data, training=False), folded(data)):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_sequential_with_nested_model_folds_and_saves(tmp_path):
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, L.BatchNormalization()(L.Dense(4)(inner_in)), name="inner")
    model = keras.Sequential(
        [keras.Input((5,)), L.Dense(4, use_bias=False), tfbn.BatchNormalization(), inner],
        name="seq",
    )
    _randomize(model)
    before = [w.numpy().copy() for w in model.weights]

    folded = fold_batch_norm(model)

    assert isinstance(folded, keras.Sequential)
    assert _bn_count(folded) == 0
    data = np.random.default_rng(4).normal(size=(3, 5)).astype("float32")
    _assert_same_inference(model, folded, data)
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, model.weights))
    path = os.path.join(tmp_path, "folded.keras")
    folded.save(path)
    np.testing.assert_array_equal(keras.models.load_model(path)(data), folded(data))


def test_affine_layer_round_trips_through_keras_file(tmp_path):
    inputs = keras.Input((2, 3))
    model = keras.Model(inputs, tfbn.BatchNormalization(axis=1)(inputs))
    _randomize(model)
    folded = fold_batch_norm(model)
    path = os.path.join(tmp_path, "affine.keras")
    folded.save(path)
    data = np.random.default_rng(5).normal(size=(4, 2, 3)).astype("float32")
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[-1], ChannelAffine)
    np.testing.assert_array_equal(loaded(data), folded(data))
    _assert_same_inference(model, loaded, data)


def test_subclassed_model_is_refused():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.bn = tfbn.BatchNormalization()

        def call(self, x):
            return self.bn(x)

    with pytest.raises(TypeError, match="Functional or Sequential"):
        fold_batch_norm(Net())


def test_folded_decisions_have_no_reason_code():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, tfbn.BatchNormalization(name="bn")(L.Dense(2)(inputs)))
    _, decisions = fold_batch_norm(model, return_report=True)
    assert [(d.reason, d.reason_code) for d in decisions] == [(None, None)]
    assert fold_reason_counts(decisions) == {}


@pytest.mark.parametrize(
    "statistic, value, message",
    [
        ("moving_variance", np.nan, "NaN or infinite values in its moving_variance"),
        ("moving_mean", np.inf, "NaN or infinite values in its moving_mean"),
        ("moving_variance", -0.5, "negative moving_variance"),
    ],
)
@pytest.mark.parametrize("bn_type", [tfbn.BatchNormalization, L.BatchNormalization])
def test_bad_statistics_are_refused_naming_the_layer(statistic, value, message, bn_type):
    inputs = keras.Input((3,))
    hidden = L.Dense(3)(tfbn.BatchNormalization(name="good")(inputs))
    model = keras.Model(inputs, bn_type(name="bad")(hidden))
    _randomize(model)
    variable = getattr(model.get_layer("bad"), statistic)
    variable.assign(np.array([1.0, value, 1.0], np.float32))
    before = [w.numpy().copy() for w in model.weights]

    with pytest.raises(ValueError, match=f"'bad'.*{message}"):
        fold_batch_norm(model)

    assert all(np.array_equal(a, w.numpy(), equal_nan=True) for a, w in zip(before, model.weights))
