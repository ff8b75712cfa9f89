"""Tests for tfbn.data: the embedded TFDS dataset, the folder loader, exact data positions."""

import os
import tempfile

import numpy as np
import pytest
import tensorflow as tf

from tfbn.data import pipeline, synthetic_shapes

DATA_DIR = os.path.join(tempfile.gettempdir(), "tfbn_test_data")


@pytest.fixture(scope="module")
def source():
    return pipeline.load_split("tfbn_shapes/source", "train", 32, DATA_DIR)


def test_rendering_is_deterministic_and_shape_dependent():
    config = synthetic_shapes.TfbnShapes.BUILDER_CONFIGS[0]
    a = synthetic_shapes.render(config, 1, np.random.default_rng(5))
    b = synthetic_shapes.render(config, 1, np.random.default_rng(5))
    c = synthetic_shapes.render(config, 0, np.random.default_rng(5))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    circle = synthetic_shapes.shape_mask("circle", 16, 16, 5)
    assert circle[16, 16] and circle[16, 21] and not circle[16, 22] and not circle[0, 0]


def test_source_and_target_share_labels_but_not_input_statistics(source):
    target = pipeline.load_split("tfbn_shapes/target", "train", 32, DATA_DIR)
    assert source.class_names == target.class_names == synthetic_shapes.SHAPES
    assert np.array_equal(np.bincount(source.labels), np.bincount(target.labels))
    assert source.images.shape == (synthetic_shapes.SPLIT_SIZES["train"], 32, 32, 3)
    # Covariate shift: per-channel means move by far more than sampling noise.
    shift = np.abs(source.images.mean((0, 1, 2)) - target.images.mean((0, 1, 2)))
    assert np.all(shift > 0.05)
    assert source.images.min() >= 0.0 and source.images.max() <= 1.0


def test_batch_of_a_step_depends_only_on_seed_and_step(source):
    from_start = list(pipeline.train_batches(source, 16, seed=3, start_step=0, end_step=140))
    resumed = list(pipeline.train_batches(source, 16, seed=3, start_step=130, end_step=140))
    for (xa, ya), (xb, yb) in zip(from_start[130:], resumed):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    other_seed = next(iter(pipeline.train_batches(source, 16, seed=4, start_step=0, end_step=1)))
    assert not np.array_equal(other_seed[1], from_start[0][1])
    # One epoch (128 steps of 16) visits every example exactly once.
    labels = np.concatenate([y.numpy() for _, y in from_start[:128]])
    assert np.array_equal(np.bincount(labels), np.bincount(source.labels))


def test_image_folder_layout(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for name in ("daisy", "roses"):
            directory = tmp_path / split / name
            directory.mkdir(parents=True)
            for index in range(count):
                image = rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)
                tf.io.write_file(str(directory / f"{index}.jpg"), tf.io.encode_jpeg(image))
    dataset = f"folder:{tmp_path}"
    assert pipeline.resolve_eval_split(dataset, None) == "val"
    train = pipeline.load_split(dataset, "train", 16)
    val = pipeline.load_split(dataset, "val", 16)
    assert train.class_names == ("daisy", "roses") and train.images.shape == (6, 16, 16, 3)
    assert list(val.labels) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="`eval_split` 'test'"):
        pipeline.resolve_eval_split(dataset, "test")


def test_unknown_dataset_and_oversized_batch(source):
    with pytest.raises(ValueError, match="not a TFDS dataset"):
        pipeline.load_split("no_such_dataset_xyz", "train", 32, DATA_DIR)
    with pytest.raises(ValueError, match="`batch_size` 4096"):
        pipeline.train_batches(source, 4096, 0, 0, 1)
