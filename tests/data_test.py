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


def test_streamed_batches_are_the_permuted_examples(source):
    # Reference: epoch e visits the examples in the stateless permutation
    # seeded by (seed, e); the pixels come from the whole split in memory.
    images, labels = source.images, source.labels
    per_epoch = pipeline.steps_per_epoch(source, 16)
    for step in (0, per_epoch - 1, per_epoch + 3):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(labels)), seed=[3, step // per_epoch]
        ).numpy()
        chosen = order[(step % per_epoch) * 16 : (step % per_epoch + 1) * 16]
        x, y = next(iter(pipeline.train_batches(source, 16, 3, step, step + 1, augment=False)))
        assert np.array_equal(x.numpy(), images[chosen])
        assert np.array_equal(y.numpy(), labels[chosen])
        flipped, y2 = next(iter(pipeline.train_batches(source, 16, 3, step, step + 1)))
        assert np.array_equal(y2.numpy(), y.numpy())
        mirrored = [
            np.array_equal(f, i[:, ::-1]) and not np.array_equal(f, i)
            for f, i in zip(flipped.numpy(), images[chosen])
        ]
        kept = [np.array_equal(f, i) for f, i in zip(flipped.numpy(), images[chosen])]
        assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)


def test_worker_rows_are_its_slice_of_the_global_batch(source):
    full = list(pipeline.train_batches(source, 16, 5, 126, 130))
    shard = list(pipeline.train_batches(source, 16, 5, 126, 130, rows=(4, 12)))
    assert len(shard) == len(full) == 4
    for (xf, yf), (xs, ys) in zip(full, shard):
        assert np.array_equal(xs[4:12], xf[4:12]) and np.array_equal(ys[4:12], yf[4:12])
        assert not np.any(xs[:4]) and not np.any(xs[12:]) and not np.any(ys[12:])
    with pytest.raises(ValueError, match="`rows`"):
        pipeline.train_batches(source, 16, 5, 0, 1, rows=(8, 20))


def test_eval_batches_in_order_and_limited(source):
    batches = list(pipeline.eval_batches(source, 100, max_batches=3))
    assert [len(y) for _, y in batches] == [100, 100, 100]
    images = np.concatenate([x.numpy() for x, _ in batches])
    assert np.array_equal(images, source.images[:300])
    every = list(pipeline.eval_batches(source, 1000))
    assert [len(y) for _, y in every] == [1000, 1000, 48]


def test_corrupt_image_fails_with_its_path(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            directory = tmp_path / split / name
            directory.mkdir(parents=True)
            for index in range(4):
                image = rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)
                tf.io.write_file(str(directory / f"{index}.png"), tf.io.encode_png(image))
    bad = tmp_path / "train" / "b" / "2.png"
    bad.write_bytes(bad.read_bytes()[:20])  # truncated: the header survives, the pixels do not
    dataset = f"folder:{tmp_path}"
    train = pipeline.load_split(dataset, "train", 8)
    assert len(train) == 8  # listing decodes nothing
    with pytest.raises(ValueError, match="Cannot decode image") as error:
        list(pipeline.train_batches(train, 4, seed=0, start_step=0, end_step=4))
    assert str(bad) in str(error.value)
    with pytest.raises(ValueError, match=str(bad)):
        list(pipeline.eval_batches(train, 3))
    with pytest.raises(ValueError, match=str(bad)):
        train.images  # noqa: B018
    val = pipeline.load_split(dataset, "val", 8)
    assert val.images.shape == (8, 8, 8, 3)


def test_folder_batches_resume_exactly(tmp_path):
    rng = np.random.default_rng(1)
    for index in range(10):
        directory = tmp_path / "train" / f"c{index % 2}"
        directory.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)
        tf.io.write_file(str(directory / f"{index}.jpg"), tf.io.encode_jpeg(image))
    split = pipeline.load_split(f"folder:{tmp_path}", "train", 8)
    # 3 steps of 3 per epoch (one example dropped), so steps 4..7 cross an epoch.
    from_start = list(pipeline.train_batches(split, 3, seed=7, start_step=0, end_step=8))
    resumed = list(pipeline.train_batches(split, 3, seed=7, start_step=4, end_step=8))
    assert len(resumed) == 4
    for (xa, ya), (xb, yb) in zip(from_start[4:], resumed):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    # Each epoch visits 9 distinct examples (without flips, to compare pixels).
    plain = pipeline.train_batches(split, 3, seed=7, start_step=3, end_step=6, augment=False)
    epoch = np.concatenate([x.numpy().reshape(3, -1) for x, _ in plain])
    assert len(np.unique(epoch, axis=0)) == 9
