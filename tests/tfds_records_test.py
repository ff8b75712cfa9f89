"""Tests for tfbn.data.tfds_records: random access to TFDS TFRecord shards."""

import os
import tempfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tfbn.data import synthetic_shapes, tfds_records  # noqa: F401  (registers tfbn_shapes)

DATA_DIR = os.path.join(tempfile.gettempdir(), "tfbn_test_data")


def test_record_i_is_the_ith_example_tfds_reads():
    builder = tfds.builder("tfbn_shapes/source", data_dir=DATA_DIR)
    builder.download_and_prepare()
    index = tfds_records.RecordIndex.from_file_instructions(
        builder.info.splits["test"].file_instructions
    )
    assert len(index) == synthetic_shapes.SPLIT_SIZES["test"]
    reference = list(builder.as_dataset(split="test", shuffle_files=False).take(40))
    decode = builder.info.features.deserialize_example
    for position in (39, 0, 17):  # out of order: random access
        example = decode(index.read(position))
        assert np.array_equal(example["image"], reference[position]["image"])
        assert int(example["label"]) == int(reference[position]["label"])
    streamed = list(index.serialized(tf.data.Dataset.from_tensor_slices([5, 3, 5])))
    assert [s.numpy() for s in streamed] == [index.read(5), index.read(3), index.read(5)]


def test_scan_finds_every_record_and_refuses_a_truncated_file(tmp_path):
    path = str(tmp_path / "data.tfrecord")
    payloads = [b"", b"x", b"hello world" * 30]
    with tf.io.TFRecordWriter(path) as writer:
        for payload in payloads:
            writer.write(payload)
    offsets, lengths = tfds_records.scan(path)
    with open(path, "rb") as stream:
        data = stream.read()
    assert [data[o : o + n] for o, n in zip(offsets, lengths)] == payloads
    with open(path, "wb") as stream:
        stream.write(data[:-3])
    with pytest.raises(ValueError, match="truncated") as error:
        tfds_records.scan(path)
    assert path in str(error.value)


def test_reads_across_more_shards_than_a_thread_keeps_open(tmp_path):
    files, file_ids, offsets, lengths, expected = [], [], [], [], []
    for shard in range(tfds_records._OPEN_FILES_PER_THREAD + 3):
        path = str(tmp_path / f"shard{shard}.tfrecord")
        payloads = [f"shard {shard} record {i}".encode() for i in range(3)]
        with tf.io.TFRecordWriter(path) as writer:
            for payload in payloads:
                writer.write(payload)
        shard_offsets, shard_lengths = tfds_records.scan(path)
        files.append(path)
        file_ids += [shard] * 3
        offsets += list(shard_offsets)
        lengths += list(shard_lengths)
        expected += payloads
    index = tfds_records.RecordIndex(files, file_ids, offsets, lengths)
    order = np.random.default_rng(0).permutation(len(expected))
    for position in np.concatenate([order, order[::-1]]):
        assert index.read(position) == expected[position]


def test_tfds_examples_are_the_split_examples_by_index():
    builder = tfds.builder("tfbn_shapes/source", data_dir=DATA_DIR)
    builder.download_and_prepare()
    examples = tfds_records.TfdsExamples("tfbn_shapes/source", builder, "test", 16)
    assert len(examples) == synthetic_shapes.SPLIT_SIZES["test"]
    reference = list(builder.as_dataset(split="test", shuffle_files=False))
    assert np.array_equal(examples.labels, [int(example["label"]) for example in reference])
    order = [7, 0, 7, 3]
    read = list(examples.examples(tf.data.Dataset.from_tensor_slices(np.int64(order))))
    for position, (image, label) in zip(order, read):
        pixels = reference[position]["image"].numpy().astype(np.float32) / 255.0
        expected = tf.image.resize(pixels, (16, 16))
        np.testing.assert_allclose(image.numpy(), expected.numpy(), atol=1e-6)
        assert int(label) == int(reference[position]["label"])
    explained = examples.explain(tf.errors.DataLossError(None, None, "corrupted record"), [0])
    assert isinstance(explained, ValueError)
    assert examples.index.files[examples.index.file_ids[0]] in str(explained)
    assert "corrupted record" in str(explained)
