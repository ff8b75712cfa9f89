"""Tests for tfbn.models: the registry, the loader, parts and BN overrides."""

import sys

import keras
import numpy as np
import pytest

import tfbn
from tfbn import models
from tfbn.finetune import update_plan


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
    names = [layer.name for layer in model.layers]
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
