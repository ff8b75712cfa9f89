"""Tests for tfbn.data.image_folder: what an image folder's listing refuses and ignores."""

import numpy as np
import pytest
import tensorflow as tf

from tfbn.data import image_folder, pipeline


def write_image(path, seed, png=False):
    """A random 10x12 RGB image as JPEG (or PNG); returns the pixels written."""
    image = np.random.default_rng(seed).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    encoded = tf.io.encode_png(image) if png else tf.io.encode_jpeg(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    tf.io.write_file(str(path), encoded)
    return image


def make_folder(root, classes=("daisy", "roses"), counts=(("train", 3), ("val", 2))):
    for split, count in counts:
        for class_index, name in enumerate(classes):
            for index in range(count):
                write_image(root / split / name / f"{index}.jpg", 10 * class_index + index)
    return root


def test_hidden_directories_and_files_are_neither_classes_nor_images(tmp_path):
    make_folder(tmp_path)
    # A notebook's checkpoint directory sorts before every class name: if it
    # were a class, every label would shift by one.
    write_image(tmp_path / "train" / ".ipynb_checkpoints" / "0-checkpoint.jpg", 99)
    write_image(tmp_path / "val" / ".ipynb_checkpoints" / "0-checkpoint.jpg", 98)
    write_image(tmp_path / "train" / "daisy" / ".hidden.jpg", 97)
    (tmp_path / ".git").mkdir()
    listing = image_folder.list_split(str(tmp_path), "train")
    assert listing.class_names == ("daisy", "roses")
    assert [path.rsplit("/", 2)[-2:] for path in listing.paths] == [
        ["daisy", "0.jpg"],
        ["daisy", "1.jpg"],
        ["daisy", "2.jpg"],
        ["roses", "0.jpg"],
        ["roses", "1.jpg"],
        ["roses", "2.jpg"],
    ]
    assert np.array_equal(listing.labels, [0, 0, 0, 1, 1, 1])
    assert pipeline.available_splits(f"folder:{tmp_path}") == ["train", "val"]
    val = pipeline.load_split(f"folder:{tmp_path}", "val", 8)
    assert val.class_names == ("daisy", "roses") and np.array_equal(val.labels, [0, 0, 1, 1])


def test_empty_class_directory_is_refused(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / "tulips").mkdir()
    (tmp_path / "train" / "tulips" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="without images") as error:
        image_folder.list_split(str(tmp_path), "train")
    assert str(tmp_path / "train" / "tulips") in str(error.value)


def test_train_and_val_class_mismatch_lists_both_class_sets(tmp_path):
    make_folder(tmp_path, classes=("cat", "dog"), counts=(("train", 2),))
    make_folder(tmp_path, classes=("Dog", "cat"), counts=(("val", 2),))
    with pytest.raises(ValueError, match="other classes") as error:
        pipeline.load_split(f"folder:{tmp_path}", "val", 8)
    message = str(error.value)
    assert "'train' classes: ['cat', 'dog']" in message
    assert "'val' classes: ['Dog', 'cat']" in message
    assert "only in 'train': ['dog']" in message and "only in 'val': ['Dog']" in message
    # A val split missing a class is refused too (its labels would still
    # line up, but the evaluation would silently skip a class).
    make_folder(tmp_path, classes=("cat",), counts=(("test", 1),))
    with pytest.raises(ValueError, match="only in 'train': \\['dog'\\]"):
        image_folder.list_split(str(tmp_path), "test")


def test_split_without_class_directories_is_refused(tmp_path):
    write_image(tmp_path / "train" / "loose.jpg", 0)
    with pytest.raises(ValueError, match="no class directories"):
        image_folder.list_split(str(tmp_path), "train")
    with pytest.raises(ValueError, match="does not exist"):
        image_folder.list_split(str(tmp_path), "val")


def test_png_and_jpeg_decode_to_their_pixels(tmp_path):
    pixels = write_image(tmp_path / "a.png", 3, png=True)
    decoded = image_folder.decode(str(tmp_path / "a.png"), 8)
    reference = tf.image.resize(pixels.astype(np.float32) / 255.0, (8, 8))
    np.testing.assert_allclose(decoded.numpy(), reference.numpy(), atol=1e-6)
    assert decoded.shape == (8, 8, 3) and decoded.dtype == tf.float32
    write_image(tmp_path / "b.jpg", 4)
    assert image_folder.unreadable_image([str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]) is None


def test_unreadable_image_names_the_first_bad_file(tmp_path):
    write_image(tmp_path / "good.jpg", 0)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    found = image_folder.unreadable_image([str(tmp_path / "good.jpg"), str(tmp_path / "bad.jpg")])
    assert found is not None and found[0] == str(tmp_path / "bad.jpg") and found[1]


def test_folder_examples_are_the_listed_images_by_index(tmp_path):
    classes = ("daisy", "roses")
    pixels = {}
    for class_index, name in enumerate(classes):
        for index in range(2):
            path = tmp_path / "train" / name / f"{index}.png"
            pixels[str(path)] = write_image(path, 10 * class_index + index, png=True)
    listing = image_folder.list_split(str(tmp_path), "train")
    examples = image_folder.FolderExamples(listing, 8)
    assert len(examples) == 4 and np.array_equal(examples.labels, [0, 0, 1, 1])
    order = [3, 0, 2, 0]  # out of order, repeated: random access
    read = list(examples.examples(tf.data.Dataset.from_tensor_slices(np.int64(order))))
    for position, (image, label) in zip(order, read):
        path = listing.paths[position]
        reference = tf.image.resize(pixels[path].astype(np.float32) / 255.0, (8, 8))
        np.testing.assert_allclose(image.numpy(), reference.numpy(), atol=1e-6)
        assert int(label) == classes.index(path.rsplit("/", 2)[-2])


def test_folder_examples_explain_names_the_undecodable_image(tmp_path):
    make_folder(tmp_path)
    listing = image_folder.list_split(str(tmp_path), "train")
    examples = image_folder.FolderExamples(listing, 8)
    error = tf.errors.InvalidArgumentError(None, None, "decode failed")
    assert examples.explain(error, range(len(examples))) is None
    bad = listing.paths[4]
    with open(bad, "wb") as stream:
        stream.write(b"\xff\xd8\xff\xe0 truncated")
    explained = examples.explain(error, [1, 4, 5])
    assert isinstance(explained, ValueError) and repr(bad) in str(explained)
    assert examples.explain(error, [0, 1]) is None
