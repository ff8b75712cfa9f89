"""Tests for tfbn.finetune.weight_sources: restoring from .keras, .weights.h5 and TF1 checkpoints.

Every restore is checked from outside: the values the source holds (read
back independently, with Keras or with `tf.train.load_checkpoint`) are
compared with `np.array_equal`, and trainer runs are checked on the model
they export.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from trainer_test import smoke_config

import tfbn
from tfbn import models
from tfbn.finetune import partial_restore, trainer, weight_sources
from tfbn.layers import introspection


def randomized(model, seed):
    rng = np.random.default_rng(seed)
    for variable in model.variables:
        value = rng.uniform(0.5, 1.5, size=variable.shape).astype("float32")
        variable.assign(value)
    return model


def by_path(model):
    return {p: v.numpy().copy() for p, v in introspection.nested_variable_paths(model).items()}


@pytest.fixture
def source_model():
    return randomized(models.build_model("bn_mlp", 4, (4, 4, 3)), seed=1)


def test_keras_file_is_read_by_nested_path(tmp_path, source_model):
    path = str(tmp_path / "source.keras")
    source_model.save(path)
    values = weight_sources.read_weights_file(path)
    expected = by_path(source_model)
    assert list(values) == list(expected)
    assert all(np.array_equal(values[p], expected[p]) for p in expected)


def test_partial_restore_from_keras_file_into_a_new_head(tmp_path, source_model):
    path = str(tmp_path / "source.keras")
    source_model.save(path)
    target = models.build_model("bn_mlp", 7, (4, 4, 3))  # Another number of classes.
    initial = by_path(target)
    report = partial_restore.restore_partial(target, path, include=["backbone/"])
    restored = by_path(target)
    source = by_path(source_model)
    assert report.checkpoint == path
    assert report.restored == [p for p in initial if p.startswith("backbone/")]
    assert report.not_restored == [p for p in initial if p.startswith("head/")]
    assert sorted(report.skipped) == sorted(p for p in source if p.startswith("head/"))
    for p in report.restored:
        assert np.array_equal(restored[p], source[p]), p
    for p in report.not_restored:
        assert np.array_equal(restored[p], initial[p]), p


def test_weights_h5_restores_into_the_same_architecture(tmp_path, source_model):
    path = str(tmp_path / "source.weights.h5")
    source_model.save_weights(path)
    target = models.build_model("bn_mlp", 4, (4, 4, 3))
    report = partial_restore.restore_partial(target, path, exclude=["head/logits/"])
    source, restored = by_path(source_model), by_path(target)
    assert report.not_restored == ["head/logits/kernel", "head/logits/bias"]
    for p in report.restored:
        assert np.array_equal(restored[p], source[p]), p


def test_weights_h5_of_another_architecture_is_a_clear_error(tmp_path, source_model):
    path = str(tmp_path / "source.weights.h5")
    source_model.save_weights(path)
    other = models.build_model("bn_mlp", 7, (4, 4, 3))
    with pytest.raises(ValueError, match="does not fit model.*Save the source model as a .keras"):
        partial_restore.restore_partial(other, path, include=["backbone/"])


def write_tf1_checkpoint(prefix, model, seed):
    """A TF1 `Saver` checkpoint of `model`'s backbone, written in graph mode.

    The BN layers are `tfbn.compat.v1.batch_normalization` (TF1 naming:
    `backbone/bn1/gamma`, ...), the kernels `tf.compat.v1.get_variable`; a
    global step and a momentum slot stand for the training bookkeeping.

    Returns:
        `{TF1 name: saved value}`.
    """
    rng = np.random.default_rng(seed)
    paths = by_path(model)
    with tf.Graph().as_default():
        with tf.compat.v1.variable_scope("backbone"):
            x = tf.compat.v1.placeholder(
                tf.float32, [None, paths["backbone/dense1/kernel"].shape[0]]
            )
            for index in (1, 2):
                kernel = tf.compat.v1.get_variable(
                    f"dense{index}/kernel",
                    paths[f"backbone/dense{index}/kernel"].shape,
                    initializer=tf.compat.v1.zeros_initializer(),
                )
                x = tfbn.compat.v1.batch_normalization(x @ kernel, training=True, name=f"bn{index}")
                tf.compat.v1.get_variable(
                    f"dense{index}/kernel/Momentum",
                    kernel.shape,
                    initializer=tf.compat.v1.zeros_initializer(),
                )
        tf.compat.v1.train.get_or_create_global_step()
        variables = tf.compat.v1.global_variables()
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as session:
            values = {}
            for variable in variables:
                name = variable.op.name
                value = rng.uniform(0.5, 1.5, variable.shape).astype(variable.dtype.as_numpy_dtype)
                variable.load(value, session)
                values[name] = value
            saver.save(session, prefix)
    return values


def test_tf1_checkpoint_maps_names_onto_paths(tmp_path):
    target = models.build_model("bn_mlp", 4, (4, 4, 3))
    prefix = str(tmp_path / "tf1" / "model.ckpt")
    saved = write_tf1_checkpoint(prefix, target, seed=3)
    assert weight_sources.is_tf1_checkpoint(prefix)
    initial = by_path(target)
    report = partial_restore.restore_partial(target, prefix, include=["backbone/"])
    restored = by_path(target)
    backbone = [p for p in initial if p.startswith("backbone/")]
    assert report.restored == backbone
    assert sorted(report.skipped) == []  # Slots and the global step are not weights.
    reader = tf.train.load_checkpoint(prefix)
    for p in backbone:
        assert np.array_equal(restored[p], reader.get_tensor(p)), p
        assert np.array_equal(restored[p], saved[p]), p
    for p in report.not_restored:
        assert np.array_equal(restored[p], initial[p]), p


def test_tf1_name_mapping():
    assert weight_sources.tf1_name_to_path("conv1/weights") == "conv1/kernel"
    assert weight_sources.tf1_name_to_path("conv1/biases:0") == "conv1/bias"
    assert weight_sources.tf1_name_to_path("dw/depthwise_kernel") == "dw/kernel"
    assert weight_sources.tf1_name_to_path("backbone/bn1/moving_mean") == "backbone/bn1/moving_mean"
    for name in ("global_step", "a/kernel/Momentum", "a/kernel/Adam_1", "beta1_power"):
        assert weight_sources.is_tf1_bookkeeping(name), name
    assert not weight_sources.is_tf1_bookkeeping("backbone/bn1/beta")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="`init_checkpoint` .*nope.keras.* does not exist"):
        weight_sources.read_weights_file(str(tmp_path / "nope.keras"))


@pytest.mark.parametrize("kind", ["keras", "weights.h5", "tf1"])
def test_trainer_restores_backbone_from_each_source(tmp_path, kind):
    """train.py --init_checkpoint=<source> --restore_part=backbone/ --update_part=head/."""
    source = randomized(models.build_model("bn_mlp", 4, (32, 32, 3)), seed=5)
    if kind == "keras":
        init = str(tmp_path / "source.keras")
        source.save(init)
        expected = by_path(source)
    elif kind == "weights.h5":
        init = str(tmp_path / "source.weights.h5")
        source.save_weights(init)
        expected = by_path(source)
    else:
        init = str(tmp_path / "tf1" / "model.ckpt")
        expected = write_tf1_checkpoint(init, source, seed=6)
    model_dir = str(tmp_path / "run")
    result = trainer.train(
        smoke_config(
            model_dir,
            f"--init_checkpoint={init}",
            "--restore_part=backbone/",
            "--update_part=head/",
            "--dataset=tfbn_shapes/target",
            "--export",
        )
    )
    backbone = [p for p in by_path(result.model) if p.startswith("backbone/")]
    assert result.restore_report.restored == backbone
    exported = by_path(keras.saving.load_model(os.path.join(model_dir, "export", "model.keras")))
    for p in backbone:
        assert np.array_equal(exported[p], expected[p]), p
    assert not np.array_equal(exported["head/fc/kernel"], by_path(source)["head/fc/kernel"])


def test_dry_run_lists_the_restore_set_from_a_keras_file(tmp_path, capsys):
    source = models.build_model("bn_mlp", 4, (32, 32, 3))
    init = str(tmp_path / "source.keras")
    source.save(init)
    config = smoke_config(
        str(tmp_path / "run"), f"--init_checkpoint={init}", "--restore_part=backbone/", "--dry_run"
    )
    trainer.train(config)
    out = capsys.readouterr().out
    backbone = [p for p in by_path(source) if p.startswith("backbone/")]
    assert f"Restore set ({len(backbone)} variables from {init}):" in out
    assert all(f"  {p}\n" in out for p in backbone)
    assert not os.path.exists(tmp_path / "run" / "checkpoint")
