"""The trainer's input pipeline: streamed from disk, with a data position that resumes exactly.

A split is a random-access source of examples on disk (an image folder's
file list, or the record index of a TFDS split, `tfbn.data.tfds_records`);
only its size, class names and per-example paths or offsets are held in
memory, so memory does not grow with the number of images. `tf.data`
reads and decodes the examples of each batch in parallel and prefetches.

The batch of training step `s` is a pure function of `(seed, s)`: epoch
`s // steps_per_epoch` visits the examples in the stateless permutation
seeded by `(seed, epoch)`, and the random horizontal flips are seeded by
`(seed, s)`. So the data position is just the global step, which the
checkpoint already holds: a resumed run sees exactly the batches an
uninterrupted run would have seen.

Sources:
    * a TFDS name (`tfbn_shapes/source`, `cifar10`, ...) prepared in
      `data_dir` (the embedded `tfbn_shapes` is generated locally, offline);
    * `folder:<root>` with images in `<root>/<split>/<class>/*.jpg|png`
      (the layout of the usual flower-photos classification sets: `train/`,
      `val/`); see `tfbn.data.image_folder` for what it refuses.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tfbn.data import (
    image_folder,
    synthetic_shapes,  # noqa: F401  (registers tfbn_shapes)
    tfds_records,
)

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "tfbn", "tensorflow_datasets")
FOLDER_PREFIX = "folder:"
EVAL_SPLIT_PREFERENCE = ("validation", "val", "test")
# Batches read ahead of the train step; the translation of a decode error
# into a file name searches this many batches past the failing one.
PREFETCH_BATCHES = 2
_MATERIALIZE_BATCH = 256


class Split:
    """One split, streamed from disk.

    Holds the number of examples, the class names and what it takes to read
    example `i` (a file path, or a record's offset): never the images.

    Args:
        description: The dataset and split, for messages.
        source: The split's examples by index (`image_folder.FolderExamples`
            or `tfds_records.TfdsExamples`: length, `labels`, `examples`,
            `explain`).
        class_names: Names of the classes, indexed by label.
        image_size: Height and width of the decoded images.

    Attributes:
        description: The dataset and split, for messages.
        class_names: Names of the classes, indexed by label.
        image_size: Height and width of the decoded images.
    """

    def __init__(self, description: str, source, class_names, image_size: int):
        self.description = description
        self.class_names = tuple(class_names)
        self.image_size = image_size
        self._source = source
        self._images = None

    def __len__(self) -> int:
        return len(self._source)

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """`(image_size, image_size, 3)`, the shape of one decoded image."""
        return (self.image_size, self.image_size, 3)

    @property
    def labels(self) -> np.ndarray:
        """int32 `[N]`: every example's label (read once; 4 bytes per example)."""
        return self._source.labels

    @property
    def images(self) -> np.ndarray:
        """float32 `[N, H, W, 3]` in [0, 1]: the whole split decoded into memory.

        For small datasets only (the experiments, tests); the trainer streams.

        Raises:
            ValueError: Naming the file, if an image cannot be decoded.
        """
        if self._images is None:
            batches = [x.numpy() for x, _ in eval_batches(self, _MATERIALIZE_BATCH)]
            self._images = np.concatenate(batches) if batches else np.zeros((0, *self.image_shape))
        return self._images

    def examples(self, indices: tf.data.Dataset) -> tf.data.Dataset:
        """Maps example indices to decoded `(image, label)` pairs, in parallel, in order.

        Args:
            indices: Scalar int64 example indices.

        Returns:
            float32 `[H, W, 3]` images in [0, 1] and int32 labels.
        """
        return self._source.examples(indices)

    def explain(self, error: tf.errors.OpError, indices) -> ValueError | None:
        """A message naming the unreadable example among `indices`, if one is found.

        Args:
            error: The error the input pipeline raised.
            indices: The example indices of the failing batches.

        Returns:
            The ValueError to raise, or None when the failure is not found there.
        """
        return self._source.explain(error, indices)


class Batches:
    """An iterable of `(images, labels)` batches that names the file behind a read error.

    Iterating yields what `dataset` yields. If the input pipeline fails to
    read or decode an example, the batches around the failing one are
    searched and a ValueError naming the file is raised instead of
    TensorFlow's message, which names no file.

    Attributes:
        dataset: The `tf.data.Dataset` of batches.
    """

    def __init__(self, dataset: tf.data.Dataset, split: Split, indices_of_batch):
        self.dataset = dataset
        self._split = split
        self._indices_of_batch = indices_of_batch

    def __iter__(self):
        iterator = iter(self.dataset)
        position = 0
        while True:
            try:
                element = next(iterator)
            except StopIteration:
                return
            except tf.errors.OpError as error:  # Undecodable, missing or damaged input.
                candidates = [
                    index
                    for offset in range(PREFETCH_BATCHES + 2)
                    for index in self._indices_of_batch(position + offset)
                ]
                explained = self._split.explain(error, candidates)
                if explained is None:
                    raise
                raise explained from None
            yield element
            position += 1


def _folder_root(dataset: str) -> str | None:
    return dataset[len(FOLDER_PREFIX) :] if dataset.startswith(FOLDER_PREFIX) else None


def available_splits(dataset: str, data_dir: str | None = None) -> list[str]:
    """The split names a dataset offers.

    Args:
        dataset: A TFDS name or `folder:<root>`.
        data_dir: TFDS data directory; default `DEFAULT_DATA_DIR`.

    Returns:
        The sorted split names (hidden directories of a folder are not splits).

    Raises:
        ValueError: If the folder does not exist or the TFDS name is unknown.
    """
    root = _folder_root(dataset)
    if root is not None:
        if not tf.io.gfile.isdir(root):
            raise ValueError(f"`dataset` {dataset!r}: {root!r} is not a directory.")
        return image_folder.subdirectories(root)
    return sorted(_tfds_builder(dataset, data_dir).info.splits.keys())


def resolve_eval_split(dataset: str, eval_split: str | None, data_dir: str | None = None) -> str:
    """`eval_split`, or the first of validation/val/test that the dataset has.

    Args:
        dataset: A TFDS name or `folder:<root>`.
        eval_split: The requested split, or None to pick one.
        data_dir: TFDS data directory; default `DEFAULT_DATA_DIR`.

    Returns:
        The split name to evaluate on.

    Raises:
        ValueError: If `eval_split` is not a split of the dataset, or None
            and the dataset has none of the preferred evaluation splits.
    """
    splits = available_splits(dataset, data_dir)
    if eval_split is not None:
        if eval_split not in splits:
            raise ValueError(
                f"`eval_split` {eval_split!r} is not a split of {dataset!r}; splits: {splits}."
            )
        return eval_split
    for name in EVAL_SPLIT_PREFERENCE:
        if name in splits:
            return name
    raise ValueError(
        f"{dataset!r} has none of the splits {EVAL_SPLIT_PREFERENCE}; pass `eval_split`."
    )


def _tfds_builder(name: str, data_dir: str | None):
    try:
        builder = tfds.builder(name, data_dir=data_dir or DEFAULT_DATA_DIR)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"`dataset` {name!r} is not a TFDS dataset ({str(error).splitlines()[0]}). "
            "Use 'tfbn_shapes/source', an installed TFDS name, or 'folder:<root>'."
        ) from None
    builder.download_and_prepare()
    return builder


def load_split(dataset: str, split: str, image_size: int, data_dir: str | None = None) -> Split:
    """Opens one split for streaming, resized to `image_size` x `image_size`.

    Lists the files (or indexes the records) of the split; decodes nothing.

    Args:
        dataset: A TFDS name or `folder:<root>`.
        split: The split name (a TFDS split, or a sub-directory of the folder).
        image_size: Height and width of the decoded images.
        data_dir: TFDS data directory; default `DEFAULT_DATA_DIR`.

    Returns:
        The `Split`.

    Raises:
        ValueError: If the dataset or split does not exist or holds no
            images, or a folder's classes are unusable (see `image_folder`).
    """
    description = f"{dataset!r} split {split!r}"
    root = _folder_root(dataset)
    if root is not None:
        try:
            listing = image_folder.list_split(root, split)
        except ValueError as error:
            # Names the argument, so train.py reports it as a --dataset usage error.
            raise ValueError(f"`dataset` {dataset!r}: {error}") from None
        source = image_folder.FolderExamples(listing, image_size)
        return Split(description, source, listing.class_names, image_size)
    builder = _tfds_builder(dataset, data_dir)
    if split not in builder.info.splits:
        raise ValueError(
            f"`dataset` {dataset!r} has no split {split!r}; splits: {sorted(builder.info.splits)}."
        )
    if builder.info.supervised_keys is None:
        raise ValueError(
            f"`dataset` {dataset!r} has no supervised (image, label) keys; "
            "it cannot train a classifier."
        )
    if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
        raise ValueError(
            f"`dataset` {dataset!r} is prepared as {builder.info.file_format.value}; "
            "the trainer streams TFRecord files. Prepare it with file_format='tfrecord' "
            "in another data_dir."
        )
    label_key = builder.info.supervised_keys[1]
    class_names = tuple(builder.info.features[label_key].names)
    source = tfds_records.TfdsExamples(dataset, builder, split, image_size)
    return Split(description, source, class_names, image_size)


def steps_per_epoch(split: Split, batch_size: int) -> int:
    """Full batches per epoch (the remainder of each permutation is dropped).

    Args:
        split: The training split.
        batch_size: Examples per batch.

    Returns:
        The number of batches per epoch.

    Raises:
        ValueError: If `batch_size` is larger than the split.
    """
    steps = len(split) // batch_size
    if steps < 1:
        raise ValueError(
            f"`batch_size` {batch_size} is larger than the split ({len(split)} examples)."
        )
    return steps


def _epoch_order(count: int, seed, epoch):
    """The stateless permutation of `range(count)` that epoch `epoch` visits."""
    return tf.random.experimental.stateless_shuffle(
        tf.range(count), seed=tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
    )


def _check_rows(rows, batch_size: int) -> tuple[int, int]:
    if rows is None:
        return 0, batch_size
    begin, end = rows
    if not 0 <= begin < end <= batch_size:
        raise ValueError(
            f"`rows` must be (begin, end) with 0 <= begin < end <= batch_size={batch_size}; "
            f"received {rows!r}."
        )
    return int(begin), int(end)


def train_batches(
    split: Split,
    batch_size: int,
    seed: int,
    start_step: int,
    end_step: int,
    augment: bool = True,
    rows: tuple[int, int] | None = None,
) -> Batches:
    """The training batches of steps `start_step .. end_step - 1`, streamed from disk.

    Args:
        split: The training split.
        batch_size: Examples per (global) batch.
        seed: The run's seed.
        start_step: The first step (the restored global step on resume).
        end_step: One past the last step.
        augment: Random horizontal flips, seeded by `(seed, step)`.
        rows: `(begin, end)`: read only these rows of each global batch (a
            worker's share under multi-worker training); the other rows are
            zeros, never read. None reads every row.

    Returns:
        `Batches` of `(images, labels)`; batch `i` is a pure function of
        `(seed, start_step + i)` (rows outside `rows` are zeros).

    Raises:
        ValueError: If `batch_size` is larger than the split, or `rows` is
            not a row range of the batch.
    """
    per_epoch = steps_per_epoch(split, batch_size)
    begin, end = _check_rows(rows, batch_size)
    count = len(split)
    first_epoch = start_step // per_epoch
    last_epoch = max(end_step - 1, start_step) // per_epoch

    def epoch_batches(epoch):
        order = _epoch_order(count, seed, epoch)[: per_epoch * batch_size]
        order = tf.reshape(order, [per_epoch, batch_size])[:, begin:end]
        return tf.data.Dataset.from_tensor_slices(tf.cast(order, tf.int64))

    step_indices = (
        tf.data.Dataset.range(first_epoch, last_epoch + 1)
        .flat_map(epoch_batches)
        .skip(start_step - first_epoch * per_epoch)
        .take(max(end_step - start_step, 0))
    )
    examples = split.examples(step_indices.unbatch()).batch(end - begin)
    steps = tf.data.Dataset.range(start_step, max(end_step, start_step))

    def finish(step, batch):
        images, labels = batch
        if (begin, end) != (0, batch_size):
            pad = [[begin, batch_size - end]]
            images = tf.pad(images, pad + [[0, 0]] * 3)
            labels = tf.pad(labels, pad)
        if augment:
            images = tf.image.stateless_random_flip_left_right(
                images, seed=tf.stack([tf.cast(seed, tf.int64), step])
            )
        return images, labels

    dataset = tf.data.Dataset.zip(steps, examples).map(finish).prefetch(PREFETCH_BATCHES)

    def indices_of_batch(position):
        step = start_step + position
        if step >= end_step:
            return []
        order = _epoch_order(count, seed, step // per_epoch).numpy()
        first = (step % per_epoch) * batch_size
        return order[first + begin : first + end].tolist()

    return Batches(dataset, split, indices_of_batch)


def eval_batches(split: Split, batch_size: int, max_batches: int = 0) -> Batches:
    """The evaluation batches in order, streamed from disk.

    Args:
        split: The evaluation split.
        batch_size: Examples per batch (the last batch may be smaller).
        max_batches: At most this many batches; 0 means all.

    Returns:
        `Batches` of `(images, labels)`.
    """
    count = len(split)
    if max_batches:
        count = min(count, max_batches * batch_size)
    dataset = (
        split.examples(tf.data.Dataset.range(count)).batch(batch_size).prefetch(PREFETCH_BATCHES)
    )

    def indices_of_batch(position):
        return list(range(position * batch_size, min((position + 1) * batch_size, count)))

    return Batches(dataset, split, indices_of_batch)
