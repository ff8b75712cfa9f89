"""Tests for tfbn.models.model_file through the trainer: `model=<file>.keras`.

A stock-Keras model is saved, then fine-tuned by the trainer without a
builder. Frozen parts are checked from outside: the exported model is
loaded back and compared with the saved file, weight by weight.
"""

import json
import os

import keras
import numpy as np
import pytest
from trainer_test import smoke_config

from tfbn.finetune import flags as tfbn_flags
from tfbn.finetune import trainer
from tfbn.layers import introspection


def save_flat_model(path, classes=4, size=16):
    """A flat stock-BN model named like keras.applications layers (`Conv_1`, `predictions`)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((size, size, 3), name="input")
    x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False, name="Conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn_Conv1")(x)
    x = keras.layers.ReLU(name="Conv1_relu")(x)
    x = keras.layers.Conv2D(8, 1, use_bias=False, name="Conv_1")(x)
    x = keras.layers.BatchNormalization(name="Conv_1_bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(classes, name="predictions")(x)
    model = keras.Model(inputs, outputs, name="flat")
    model.save(path)
    return path


def weights_of(path):
    model = keras.saving.load_model(path)
    return {p: v.numpy() for p, v in introspection.nested_variable_paths(model).items()}


def finetune_flags(model_file, *extra):
    return (
        f"--model={model_file}",
        "--dataset=tfbn_shapes/target",
        "--update_part=Conv_1",
        "--update_part=predictions",
        "--export",
        *extra,
    )


def test_finetune_saved_flat_model_keeps_frozen_layers(tmp_path):
    model_file = save_flat_model(str(tmp_path / "flat.keras"))
    model_dir = str(tmp_path / "run")
    result = trainer.train(smoke_config(model_dir, *finetune_flags(model_file)))
    # The images were resized to the model's 16x16 input (the smoke config says 32).
    assert result.model.input_shape == (None, 16, 16, 3)
    original = weights_of(model_file)
    exported = weights_of(os.path.join(model_dir, "export", "model.keras"))
    assert list(exported) == list(original)
    for path in original:
        trained = path.startswith(("Conv_1", "predictions"))
        if trained and path.endswith(("kernel", "moving_mean")):
            assert not np.array_equal(exported[path], original[path]), path
        if not trained:
            assert np.array_equal(exported[path], original[path]), path
    with open(os.path.join(model_dir, "bn_report.json")) as stream:
        report = json.load(stream)
    assert {row["path"]: row["mode"] for row in report["layers"]} == {
        "bn_Conv1": "inference",
        "Conv_1_bn": "train",
    }
    assert report["frozen_statistics_verdict"] == "yes (1 layer checked)"


def test_resumed_run_on_a_saved_model_matches_an_uninterrupted_one(tmp_path):
    model_file = save_flat_model(str(tmp_path / "flat.keras"))
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    trainer.train(smoke_config(whole, *finetune_flags(model_file)))
    trainer.train(smoke_config(parts, *finetune_flags(model_file, "--train_steps=6")))
    resumed = trainer.train(smoke_config(parts, *finetune_flags(model_file)))
    assert resumed.resumed_from.endswith("-6") and resumed.global_step == 10
    expected = weights_of(os.path.join(whole, "export", "model.keras"))
    got = weights_of(os.path.join(parts, "export", "model.keras"))
    for path in expected:
        assert np.array_equal(got[path], expected[path]), path


@pytest.mark.parametrize("classes", [3, 6])
def test_output_that_does_not_match_the_classes_is_refused(tmp_path, classes):
    model_file = save_flat_model(str(tmp_path / "flat.keras"), classes=classes)
    config = smoke_config(str(tmp_path / "run"), *finetune_flags(model_file))
    with pytest.raises(ValueError) as error:
        trainer.train(config)
    message = tfbn_flags.as_flag_message(str(error.value))
    assert f"--model '{model_file}' outputs {classes} logits" in message
    assert "--dataset 'tfbn_shapes/target' has 4 classes" in message
    assert not os.path.exists(os.path.join(str(tmp_path / "run"), "ckpt-10.index"))


def test_dry_run_prints_the_paths_patterns_match(tmp_path, capsys):
    model_file = save_flat_model(str(tmp_path / "flat.keras"))
    trainer.train(smoke_config(str(tmp_path / "run"), *finetune_flags(model_file, "--dry_run")))
    out = capsys.readouterr().out
    assert "re.match-ed against these nested layer paths" in out
    assert (
        f"Model {model_file}: architecture and weights from the file; images resized to 16x16"
        in out
    )
    assert "  Conv_1/kernel" in out and "  Conv1/kernel" in out
    assert "Conv_1_bn: in update set, mode=train" in out
    assert "bn_Conv1: frozen, mode=inference" in out


def test_missing_model_file_is_a_flag_error(tmp_path):
    with pytest.raises(Exception, match="--model .*does not exist"):
        smoke_config(str(tmp_path / "run"), f"--model={tmp_path}/missing.keras")


def test_exported_bundled_model_keeps_its_parts_for_the_next_finetune(tmp_path):
    """Issue: after save/load `head/` matched nothing; the parts are now nested models."""
    pre, fine = str(tmp_path / "pre"), str(tmp_path / "fine")
    trainer.train(smoke_config(pre, "--export"))
    exported = os.path.join(pre, "export", "model.keras")
    result = trainer.train(
        smoke_config(
            fine,
            f"--model={exported}",
            "--dataset=tfbn_shapes/target",
            "--update_part=head/",
            "--export",
        )
    )
    assert {row["path"] for row in result.bn_rows} == {"backbone/bn1", "backbone/bn2", "head/fc_bn"}
    before = weights_of(exported)
    after = weights_of(os.path.join(fine, "export", "model.keras"))
    for path in before:
        if path.startswith("backbone/"):
            assert np.array_equal(after[path], before[path]), path
    assert not np.array_equal(after["head/fc/kernel"], before["head/fc/kernel"])
