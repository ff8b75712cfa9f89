"""Tests for tfbn.models: the registry, the loader, parts and BN overrides."""

import sys

import keras
import numpy as np
import pytest

import tfbn
from tfbn import models
from tfbn.finetune import update_plan
from tfbn.layers import introspection


@pytest.mark.parametrize("name, num_bn", [("tiny_darknet", 4), ("bn_mlp", 3), ("inception_bn", 23)])
def test_registered_models_have_backbone_and_head(name, num_bn):
    model = models.build_model(name, 5, (32, 32, 3))
    paths = [v.path for v in model.variables]
    assert {p.split("/")[0] for p in paths} == {"backbone", "head"}
    bns = update_plan.batch_norm_layers(model)
    assert len(bns) == num_bn and all(isinstance(layer, tfbn.BatchNormalization) for layer in bns)
    logits = model(np.zeros((2, 32, 32, 3), np.float32), training=False)
    assert logits.shape == (2, 5)


def test_tiny_darknet_blocks_are_conv_bn_leaky():
    model = models.build_model("tiny_darknet", 3, (32, 32, 3))
    assert [layer.name for layer in model.layers] == ["images", "backbone", "head"]
    names = [layer.name for layer in model.get_layer("backbone").layers]
    assert names[1:4] == ["conv1", "bn1", "leaky1"]
    assert model.get_layer("conv1").use_bias is False
    assert model.get_layer("leaky1").negative_slope == pytest.approx(0.1)


def test_bn_overrides_reach_every_bn_layer():
    model = models.build_model("bn_mlp", 3, (8, 8, 3), bn_momentum=0.9, bn_epsilon=1e-5)
    assert all(
        layer.momentum == 0.9 and layer.epsilon == 1e-5
        for layer in update_plan.batch_norm_layers(model)
    )


def test_user_builder_with_stock_keras_bn(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import keras\n"
        "def net(num_classes, input_shape):\n"
        "    inputs = keras.Input(input_shape)\n"
        "    x = keras.layers.Conv2D(4, 3, name='conv')(inputs)\n"
        "    x = keras.layers.BatchNormalization(name='bn')(x)\n"
        "    x = keras.layers.GlobalAveragePooling2D()(x)\n"
        "    return keras.Model(inputs, keras.layers.Dense(num_classes, name='fc')(x))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = models.build_model("my_models:net", 2, (8, 8, 3), bn_momentum=0.5)
    (bn,) = update_plan.batch_norm_layers(model)
    assert isinstance(bn, keras.layers.BatchNormalization) and bn.momentum == 0.5
    sys.modules.pop("my_models", None)


@pytest.mark.parametrize(
    "name, message",
    [
        ("resnet9000", "not registered"),
        ("no_such_module_xyz:net", "cannot import"),
        ("tfbn.models:missing", "no function"),
    ],
)
def test_bad_model_names(name, message):
    with pytest.raises(ValueError, match=message):
        models.build_model(name, 2, (8, 8, 3))


@pytest.mark.parametrize("name", ["tiny_darknet", "bn_mlp", "inception_bn"])
def test_parts_are_nested_models_and_paths_survive_save_and_load(name, tmp_path):
    model = models.build_model(name, 4, (32, 32, 3))
    parts = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert [part.name for part in parts] == ["backbone", "head"]
    built = introspection.nested_variable_paths(model)
    # The nested paths are today's variable paths, so configs and patterns keep working.
    assert list(built) == [variable.path for variable in model.variables]
    for variable in model.variables:
        variable.assign(np.random.default_rng(0).normal(size=variable.shape).astype("float32"))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    reloaded = introspection.nested_variable_paths(loaded)
    assert list(reloaded) == list(built)
    for path, variable in built.items():
        assert np.array_equal(reloaded[path].numpy(), variable.numpy()), path
    # Keras' own variable paths lose the part scopes on load: the reason for nested paths.
    assert any("/" not in v.path.split("/", 1)[1] for v in loaded.variables)


def test_get_layer_finds_layers_inside_parts():
    model = models.build_model("bn_mlp", 3, (8, 8, 3))
    assert model.get_layer("fc_bn") is model.get_layer("head").get_layer("fc_bn")
    with pytest.raises(ValueError):
        model.get_layer("no_such_layer")


def _save_stock_model(path, classes, input_shape=(16, 16, 3)):
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(classes, name="fc")(x))
    model.save(path)
    return model


def test_model_file_loads_architecture_and_weights(tmp_path):
    path = str(tmp_path / "stock.keras")
    saved = _save_stock_model(path, 3)
    assert models.input_image_size(path, 32) == 16
    model = models.build_model(path, 3, (16, 16, 3), bn_momentum=0.5)
    for before, after in zip(saved.variables, model.variables):
        assert np.array_equal(before.numpy(), after.numpy())
    (bn,) = update_plan.batch_norm_layers(model)
    assert isinstance(bn, keras.layers.BatchNormalization) and bn.momentum == 0.5
    assert list(introspection.nested_variable_paths(model))[:2] == ["conv/kernel", "conv/bias"]


def test_model_file_input_size_must_be_square(tmp_path):
    path = str(tmp_path / "wide.keras")
    _save_stock_model(path, 3, input_shape=(16, 24, 3))
    with pytest.raises(ValueError, match="16x24 images"):
        models.input_image_size(path, 32)
    gray = str(tmp_path / "gray.keras")
    _save_stock_model(gray, 3, input_shape=(16, 16, 1))
    with pytest.raises(ValueError, match="1-channel images"):
        models.input_image_size(gray, 32)
    assert models.input_image_size("tiny_darknet", 32) == 32


@pytest.mark.parametrize("classes", [2, 5])
def test_output_must_match_the_number_of_classes(tmp_path, classes):
    path = str(tmp_path / "m.keras")
    _save_stock_model(path, classes)
    with pytest.raises(ValueError) as error:
        models.build_model(path, 3, (16, 16, 3), dataset="tfbn_shapes/target")
    message = str(error.value)
    assert f"outputs {classes} logits" in message and "has 3 classes" in message
    assert "tfbn_shapes/target" in message and "classes=3" in message


def test_builder_ignoring_num_classes_is_refused(tmp_path, monkeypatch):
    (tmp_path / "fixed_models.py").write_text(
        "import keras\n"
        "def net(num_classes, input_shape):\n"
        "    inputs = keras.Input(input_shape)\n"
        "    x = keras.layers.Flatten()(inputs)\n"
        "    return keras.Model(inputs, keras.layers.Dense(10)(x))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="outputs 10 logits, but the dataset has 4 classes"):
        models.build_model("fixed_models:net", 4, (8, 8, 3))
    sys.modules.pop("fixed_models", None)


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        models.build_model(str(tmp_path / "nope.keras"), 3, (8, 8, 3))


def test_model_file_ending_in_softmax_warns(tmp_path, caplog):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    path = str(tmp_path / "probabilities.keras")
    keras.Model(inputs, outputs).save(path)
    with caplog.at_level("WARNING"):
        models.build_model(path, 3, (8, 8, 3))
    assert "ends in a softmax (layer 'predictions')" in caplog.text
    assert "classifier_activation=None" in caplog.text


def test_sequential_model_file_input_size(tmp_path):
    path = str(tmp_path / "seq.keras")
    model = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            keras.layers.Conv2D(2, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4, name="fc"),
        ]
    )
    model.save(path)
    assert models.input_image_size(path, 32) == 12
    loaded = models.build_model(path, 4, (12, 12, 3))
    assert list(introspection.nested_variable_paths(loaded))[:2] == ["conv/kernel", "conv/bias"]
