"""Random access to a TFDS split stored as TFRecord shards (TFDS's default format).

`builder.as_data_source()` offers random access only for datasets prepared
as ArrayRecord or Parquet; the embedded `tfbn_shapes` and most prepared
datasets are TFRecord files. A TFRecord file is a sequence of
`[uint64 length][uint32 crc of length][data][uint32 crc of data]` records, so
one pass over the 12-byte headers (seeking past the data) gives every
record's offset and length; after that, example `i` is one seek and one read.
The index costs 20 bytes per example and nothing is decoded to build it.
That is what lets the trainer shuffle a TFDS split as a pure function of
`(seed, epoch)` while streaming it from disk (`TfdsExamples`, the split's
example source for `tfbn.data.pipeline`).
"""

from __future__ import annotations

import collections
import struct
import threading

import numpy as np
import tensorflow as tf

from tfbn.data import image_folder

_HEADER = struct.Struct("<QI")
_FOOTER_BYTES = 4
_OPEN_FILES_PER_THREAD = 8
_READ_GROUP = 64


class RecordIndex:
    """Offsets of the serialized examples of one split, in the split's order.

    Args:
        files: The shard paths.
        file_ids: int32 `[N]`, the shard of each example.
        offsets: int64 `[N]`, where each example's bytes start in its shard.
        lengths: int64 `[N]`, each example's byte count.
    """

    def __init__(self, files, file_ids, offsets, lengths):
        self.files = tuple(files)
        self.file_ids = np.asarray(file_ids, np.int32)
        self.offsets = np.asarray(offsets, np.int64)
        self.lengths = np.asarray(lengths, np.int64)
        self._handles = threading.local()

    @classmethod
    def from_file_instructions(cls, instructions) -> RecordIndex:
        """Indexes the records that TFDS file instructions select.

        Args:
            instructions: `builder.info.splits[split].file_instructions`
                (each with `filename`, `skip` and `take`).

        Returns:
            The index.

        Raises:
            ValueError: If a shard is truncated or is not a TFRecord file.
        """
        files, file_ids, offsets, lengths = [], [], [], []
        for instruction in instructions:
            file_offsets, file_lengths = scan(instruction.filename)
            stop = None if instruction.take in (None, -1) else instruction.skip + instruction.take
            file_offsets = file_offsets[instruction.skip : stop]
            file_lengths = file_lengths[instruction.skip : stop]
            file_ids.append(np.full(len(file_offsets), len(files), np.int32))
            files.append(instruction.filename)
            offsets.append(file_offsets)
            lengths.append(file_lengths)
        if not files:
            return cls((), [], [], [])
        return cls(
            files, np.concatenate(file_ids), np.concatenate(offsets), np.concatenate(lengths)
        )

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, index: int) -> bytes:
        """The serialized example `index`.

        Args:
            index: The example's position in the split, in `[0, len(self))`.

        Returns:
            Its bytes.
        """
        index = int(index)
        handle = self._handle(int(self.file_ids[index]))
        handle.seek(int(self.offsets[index]))
        return handle.read(int(self.lengths[index]))

    def _handle(self, file_id: int):
        # Handles are per thread: tf.data calls `read` from its parallel-map
        # threads, and a shared handle would race on `seek`. Each thread keeps
        # the few it used last (a shuffled epoch jumps between all shards, and
        # a large dataset has more shards than a process may open).
        handles = getattr(self._handles, "files", None)
        if handles is None:
            handles = self._handles.files = collections.OrderedDict()
        if file_id in handles:
            handles.move_to_end(file_id)
        else:
            if len(handles) >= _OPEN_FILES_PER_THREAD:
                handles.popitem(last=False)[1].close()
            handles[file_id] = tf.io.gfile.GFile(self.files[file_id], "rb")
        return handles[file_id]

    def serialized(self, indices: tf.data.Dataset) -> tf.data.Dataset:
        """Maps a dataset of int64 example indices to their serialized examples.

        Reads groups of `_READ_GROUP` records per Python call (the reads are
        Python; one call per example would cost more than the decoding).

        Args:
            indices: Scalar int64 indices.

        Returns:
            The dataset of scalar tf.string tensors, in the same order.
        """

        def read(group):
            return np.array([self.read(index) for index in group], dtype=object)

        def read_in_graph(group):
            data = tf.numpy_function(read, [group], tf.string, stateful=False)
            data.set_shape([None])
            return data

        groups = indices.batch(_READ_GROUP).map(read_in_graph, num_parallel_calls=tf.data.AUTOTUNE)
        return groups.unbatch()


class TfdsExamples:
    """Random access to a TFDS split's examples: read by index from its shards, decoded on demand.

    The example source of a `tfbn.data.pipeline.Split`: only the
    `RecordIndex` (20 bytes per example) is held in memory.

    Args:
        name: The TFDS dataset name, for messages.
        builder: The prepared `tfds` builder (TFRecord file format, with
            supervised keys).
        split: The split name.
        image_size: Height and width of the decoded images.
    """

    def __init__(self, name: str, builder, split: str, image_size: int):
        self.name = name
        self.index = RecordIndex.from_file_instructions(
            builder.info.splits[split].file_instructions
        )
        self.features = builder.info.features
        self.image_key, self.label_key = builder.info.supervised_keys
        self.image_size = image_size
        self._labels = None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> np.ndarray:
        """int32 `[N]`: every example's label (read and decoded once, on first use)."""
        if self._labels is None:
            label_key = self.label_key
            serialized = self.index.serialized(tf.data.Dataset.range(len(self.index)))
            labels = serialized.map(
                lambda data: tf.cast(self.features.deserialize_example(data)[label_key], tf.int32),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            chunks = [chunk.numpy() for chunk in labels.batch(4096)]
            self._labels = np.concatenate(chunks) if chunks else np.zeros([0], np.int32)
        return self._labels

    def examples(self, indices: tf.data.Dataset) -> tf.data.Dataset:
        """Maps example indices to decoded `(image, label)` pairs, in parallel, in order.

        Args:
            indices: Scalar int64 example indices.

        Returns:
            float32 `[H, W, 3]` images in [0, 1] and int32 labels.
        """
        size, image_key, label_key = self.image_size, self.image_key, self.label_key

        def decode(data):
            example = self.features.deserialize_example(data)
            image = image_folder.resize(example[image_key], size)
            return image, tf.cast(example[label_key], tf.int32)

        serialized = self.index.serialized(indices)
        return serialized.map(decode, num_parallel_calls=tf.data.AUTOTUNE)

    def explain(self, error: tf.errors.OpError, indices) -> ValueError | None:
        """A message naming the shards that hold the failing examples.

        Args:
            error: The error the input pipeline raised.
            indices: The example indices of the failing batches.

        Returns:
            The ValueError to raise.
        """
        shards = sorted({self.index.files[self.index.file_ids[int(i)]] for i in indices})
        first_line = (error.message or "").strip().splitlines()[:1]
        return ValueError(
            f"Cannot read an example of TFDS dataset {self.name!r} from {shards} "
            f"({first_line[0] if first_line else type(error).__name__}). Delete the "
            "dataset's directory and prepare it again."
        )


def scan(path: str) -> tuple[np.ndarray, np.ndarray]:
    """The data offsets and lengths of every record of one TFRecord file.

    Args:
        path: The file.

    Returns:
        `(offsets, lengths)`, int64 arrays.

    Raises:
        ValueError: If the file ends inside a record.
    """
    offsets, lengths = [], []
    size = tf.io.gfile.stat(path).length
    with tf.io.gfile.GFile(path, "rb") as stream:
        position = 0
        while position < size:
            header = stream.read(_HEADER.size)
            if len(header) < _HEADER.size:
                break
            length, _ = _HEADER.unpack(header)
            offsets.append(position + _HEADER.size)
            lengths.append(length)
            position += _HEADER.size + length + _FOOTER_BYTES
            if position >= size:
                break
            stream.seek(position)
    if position != size:
        raise ValueError(
            f"TFRecord file {path!r} is truncated or not a TFRecord file (a record ends at "
            f"byte {position}, the file has {size}). Delete the dataset's directory and "
            "prepare it again."
        )
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)
