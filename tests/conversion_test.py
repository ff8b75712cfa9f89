"""Tests for tfbn.tools.conversion: Keras <-> tfbn clones and the PyTorch importer."""

import re
import warnings

import keras
import numpy as np
import pytest

import tfbn
from tfbn.tools.conversion import convert_batch_norm, load_torch_batch_norm_state

L = keras.layers


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        weight.assign(rng.uniform(0.5, 2.0, weight.shape).astype(weight.dtype))


def _bn_layers(model):
    bn_types = (tfbn.BatchNormalization, L.BatchNormalization)
    return [layer for layer in model._flatten_layers() if isinstance(layer, bn_types)]


def _keras_model():
    inputs = keras.Input((3, 4, 4))
    x = L.Conv2D(3, 1, data_format="channels_first")(inputs)
    x = L.BatchNormalization(axis=1, epsilon=1e-5, momentum=0.9, center=False, name="bn1")(x)
    inner = keras.Sequential(
        [keras.Input((3, 4, 4)), L.BatchNormalization(name="inner_bn")], name="inner"
    )
    x = L.BatchNormalization(renorm=True, renorm_clipping={"rmax": 2.0}, name="bn2")(inner(x))
    return keras.Model(inputs, x)


def test_keras_to_tfbn_and_back_is_bit_identical_in_inference():
    model = _keras_model()
    _randomize(model)
    data = np.random.default_rng(1).normal(size=(2, 3, 4, 4)).astype("float32")
    expected = model(data, training=False).numpy()

    converted = convert_batch_norm(model, to="tfbn")

    layers = _bn_layers(converted)
    assert [type(layer) for layer in layers] == [tfbn.BatchNormalization] * 3
    assert [layer.path for layer in layers] == ["bn1", "inner/inner_bn", "bn2"]
    first = layers[0]
    assert (first.axis, first.epsilon, first.momentum, first.center) == (1, 1e-5, 0.9, False)
    assert layers[2].renorm and layers[2].renorm_clipping == {"rmax": 2.0}
    assert np.array_equal(converted(data, training=False).numpy(), expected)
    for original, clone in zip(model.weights, converted.weights):
        assert np.array_equal(original.numpy(), clone.numpy())

    back = convert_batch_norm(converted, to="keras")

    assert [type(layer) for layer in _bn_layers(back)] == [L.BatchNormalization] * 3
    assert np.array_equal(back(data, training=False).numpy(), expected)


def test_training_outputs_agree():
    inputs = keras.Input((5,))
    model = keras.Model(inputs, L.BatchNormalization()(inputs))
    _randomize(model)
    converted = convert_batch_norm(model, to="tfbn")
    data = np.random.default_rng(2).normal(3.0, 2.0, size=(8, 5)).astype("float32")
    np.testing.assert_allclose(
        converted(data, training=True), model(data, training=True), atol=1e-5
    )
    np.testing.assert_allclose(converted.weights[2].numpy(), model.weights[2].numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, feature",
    [
        ({"axis": [1, 2]}, "axis=[1, 2]"),
        ({"momentum": None}, "momentum=None"),
        ({"moving_variance_estimator": "unbiased"}, "unbiased"),
        ({"virtual_batch_size": 2}, "virtual_batch_size=2"),
    ],
)
def test_tfbn_features_keras_lacks_are_refused(kwargs, feature):
    inputs = keras.Input((3, 4))
    model = keras.Model(inputs, tfbn.BatchNormalization(name="odd", **kwargs)(inputs))
    with pytest.raises(ValueError, match="'odd'.*" + re.escape(feature)):
        convert_batch_norm(model, to="keras")


def test_unknown_target_is_refused():
    inputs = keras.Input((3,))
    with pytest.raises(ValueError, match="`to`"):
        convert_batch_norm(keras.Model(inputs, inputs), to="torch")


def _torch_state(channels, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "bn.weight": rng.uniform(0.5, 2.0, channels).astype("float32"),
        "bn.bias": rng.normal(size=channels).astype("float32"),
        "bn.running_mean": rng.normal(size=channels).astype("float32"),
        "bn.running_var": rng.uniform(0.5, 2.0, channels).astype("float32"),
        "bn.num_batches_tracked": np.array(7, np.int64),
    }


def test_torch_state_reproduces_torch_inference_and_update_rule():
    state = _torch_state(3)
    layer = tfbn.BatchNormalization(
        axis=1, momentum=0.9, epsilon=1e-5, moving_variance_estimator="unbiased"
    )
    layer.build((None, 3, 4, 4))

    load_torch_batch_norm_state(layer, state, torch_momentum=0.1, torch_eps=1e-5, prefix="bn.")

    x = np.random.default_rng(1).normal(size=(2, 3, 4, 4)).astype("float32")
    view = (1, 3, 1, 1)
    # PyTorch's eval-mode formula, channels on dim 1.
    expected = (x - state["bn.running_mean"].reshape(view)) / np.sqrt(
        state["bn.running_var"].reshape(view) + 1e-5
    ) * state["bn.weight"].reshape(view) + state["bn.bias"].reshape(view)
    np.testing.assert_allclose(layer(x, training=False), expected, rtol=1e-5, atol=1e-6)
    # PyTorch's training update: running = (1 - 0.1) * running + 0.1 * unbiased var.
    layer(x, training=True)
    batch_var = x.astype(np.float64).var((0, 2, 3), ddof=1)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), 0.9 * state["bn.running_var"] + 0.1 * batch_var, rtol=1e-5
    )


def test_torch_cumulative_momentum_loads_num_batches_tracked():
    layer = tfbn.BatchNormalization(
        momentum=None, epsilon=1e-5, moving_variance_estimator="unbiased"
    )
    layer.build((None, 3))
    state = {k[3:]: v for k, v in _torch_state(3).items()}
    load_torch_batch_norm_state(layer, state, torch_momentum=None)
    assert int(layer.num_batches_tracked.numpy()) == 7
    assert np.array_equal(layer.moving_variance.numpy(), state["running_var"])


def test_torch_convention_mismatches_are_refused():
    state = {k[3:]: v for k, v in _torch_state(3).items()}
    keras_layer = L.BatchNormalization(momentum=0.99, epsilon=1e-5)
    keras_layer.build((None, 3))
    with pytest.raises(ValueError, match="1 - PyTorch momentum"):
        load_torch_batch_norm_state(keras_layer, state, torch_momentum=0.1)
    with pytest.raises(ValueError, match="epsilon"):
        load_torch_batch_norm_state(keras_layer, state, torch_momentum=0.01, torch_eps=1e-3)
    affine_free = {k: v for k, v in state.items() if k not in ("weight", "bias")}
    with pytest.raises(ValueError, match=r"missing keys \['bias', 'weight'\]"):
        load_torch_batch_norm_state(keras_layer, affine_free, torch_momentum=0.01)
    with pytest.raises(ValueError, match="vector of 3"):
        load_torch_batch_norm_state(
            keras_layer, dict(state, running_mean=np.zeros(4)), torch_momentum=0.01
        )
    with pytest.raises(ValueError, match="not built"):
        load_torch_batch_norm_state(tfbn.BatchNormalization(), state)


def test_biased_layer_loads_with_a_warning():
    state = {k[3:]: v for k, v in _torch_state(2).items()}
    layer = L.BatchNormalization(momentum=0.9, epsilon=1e-5)
    layer.build((None, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_torch_batch_norm_state(layer, state)
    assert any("unbiased" in str(w.message) for w in caught)
    assert np.array_equal(layer.gamma.numpy(), state["weight"])
    assert np.array_equal(layer.moving_variance.numpy(), state["running_var"])
