"""The trainer's input pipeline, with a data position that resumes exactly.

A split is loaded once into memory as float32 images in [0, 1]. The batch of
training step `s` is a pure function of `(seed, s)`: epoch `s // steps_per_epoch`
uses the stateless permutation seeded by `(seed, epoch)`, and the random
horizontal flips are seeded by `(seed, s)`. So the data position is just the
global step, which the checkpoint already holds: a resumed run sees exactly
the batches an uninterrupted run would have seen.

Sources:
    * a TFDS name (`tfbn_shapes/source`, `cifar10`, ...) prepared in
      `data_dir` (the embedded `tfbn_shapes` is generated locally, offline);
    * `folder:<root>` with images in `<root>/<split>/<class>/*.jpg|png`
      (the layout of the usual flower-photos classification sets: `train/`, `val/`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tfbn.data import synthetic_shapes  # noqa: F401  (registers tfbn_shapes)

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "tfbn", "tensorflow_datasets")
FOLDER_PREFIX = "folder:"
EVAL_SPLIT_PREFERENCE = ("validation", "val", "test")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


@dataclasses.dataclass(frozen=True)
class Split:
    """One split in memory.

    Attributes:
        images: float32 `[N, H, W, C]` in [0, 1].
        labels: int32 `[N]`.
        class_names: Names of the classes, indexed by label.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return len(self.class_names)


def _folder_root(dataset: str) -> str | None:
    return dataset[len(FOLDER_PREFIX) :] if dataset.startswith(FOLDER_PREFIX) else None


def available_splits(dataset: str, data_dir: str | None = None) -> list[str]:
    """The split names a dataset offers.

    Args:
        dataset: A TFDS name or `folder:<root>`.
        data_dir: TFDS data directory; default `DEFAULT_DATA_DIR`.

    Returns:
        The sorted split names.

    Raises:
        ValueError: If the folder does not exist or the TFDS name is unknown.
    """
    root = _folder_root(dataset)
    if root is not None:
        if not tf.io.gfile.isdir(root):
            raise ValueError(f"`dataset` {dataset!r}: {root!r} is not a directory.")
        return sorted(
            name
            for name in tf.io.gfile.listdir(root)
            if tf.io.gfile.isdir(os.path.join(root, name))
        )
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
    """Loads one split into memory, resized to `image_size` x `image_size`.

    Args:
        dataset: A TFDS name or `folder:<root>`.
        split: The split name (a TFDS split, or a sub-directory of the folder).
        image_size: Height and width of the returned images.
        data_dir: TFDS data directory; default `DEFAULT_DATA_DIR`.

    Returns:
        The `Split`.

    Raises:
        ValueError: If the dataset or split does not exist or holds no images.
    """
    root = _folder_root(dataset)
    if root is not None:
        return _load_folder(root, split, image_size)
    builder = _tfds_builder(dataset, data_dir)
    if split not in builder.info.splits:
        raise ValueError(
            f"{dataset!r} has no split {split!r}; splits: {sorted(builder.info.splits)}."
        )
    if builder.info.supervised_keys is None:
        raise ValueError(
            f"{dataset!r} has no supervised (image, label) keys; it cannot train a classifier."
        )
    label_key = builder.info.supervised_keys[1]
    class_names = tuple(builder.info.features[label_key].names)
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    ds = ds.map(lambda image, label: (_prepare(image, image_size), tf.cast(label, tf.int32)))
    images, labels = [], []
    for image_batch, label_batch in tfds.as_numpy(ds.batch(1024)):
        images.append(image_batch)
        labels.append(label_batch)
    return Split(np.concatenate(images), np.concatenate(labels), class_names)


def _prepare(image, image_size: int):
    image = tf.image.convert_image_dtype(image, tf.float32)
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    return tf.image.resize(image, (image_size, image_size))


def _load_folder(root: str, split: str, image_size: int) -> Split:
    split_dir = os.path.join(root, split)
    if not tf.io.gfile.isdir(split_dir):
        raise ValueError(
            f"Image folder split {split_dir!r} does not exist "
            f"(expected <root>/{split}/<class>/*.jpg)."
        )
    # Class names come from the train split so every split labels alike.
    class_dir = (
        os.path.join(root, "train") if tf.io.gfile.isdir(os.path.join(root, "train")) else split_dir
    )
    class_names = tuple(
        sorted(
            name.rstrip("/")
            for name in tf.io.gfile.listdir(class_dir)
            if tf.io.gfile.isdir(os.path.join(class_dir, name))
        )
    )
    images, labels = [], []
    for label, name in enumerate(class_names):
        directory = os.path.join(split_dir, name)
        if not tf.io.gfile.isdir(directory):
            continue
        for filename in sorted(tf.io.gfile.listdir(directory)):
            if not filename.lower().endswith(_IMAGE_EXTENSIONS):
                continue
            data = tf.io.read_file(os.path.join(directory, filename))
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
            images.append(_prepare(image, image_size).numpy())
            labels.append(label)
    if not images:
        raise ValueError(f"No images found under {split_dir!r} (expected <class>/*.jpg).")
    return Split(np.stack(images), np.asarray(labels, np.int32), class_names)


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
    steps = len(split.labels) // batch_size
    if steps < 1:
        raise ValueError(
            f"`batch_size` {batch_size} is larger than the split ({len(split.labels)} examples)."
        )
    return steps


def train_batches(
    split: Split, batch_size: int, seed: int, start_step: int, end_step: int, augment: bool = True
) -> tf.data.Dataset:
    """The training batches of steps `start_step .. end_step - 1`.

    Args:
        split: The training split.
        batch_size: Examples per batch.
        seed: The run's seed.
        start_step: The first step (the restored global step on resume).
        end_step: One past the last step.
        augment: Random horizontal flips, seeded by `(seed, step)`.

    Returns:
        A dataset of `(images, labels)`; batch `i` is a pure function of
        `(seed, start_step + i)`.
    """
    per_epoch = steps_per_epoch(split, batch_size)
    images = tf.constant(split.images)
    labels = tf.constant(split.labels)
    count = len(split.labels)

    def batch_for(step):
        epoch, position = step // per_epoch, step % per_epoch
        order = tf.random.experimental.stateless_shuffle(
            tf.range(count), seed=tf.stack([tf.cast(seed, tf.int64), epoch])
        )
        indices = order[position * batch_size : (position + 1) * batch_size]
        batch_images = tf.gather(images, indices)
        if augment:
            batch_images = tf.image.stateless_random_flip_left_right(
                batch_images, seed=tf.stack([tf.cast(seed, tf.int64), step])
            )
        return batch_images, tf.gather(labels, indices)

    return tf.data.Dataset.range(start_step, end_step).map(batch_for).prefetch(2)


def eval_batches(split: Split, batch_size: int, max_batches: int = 0) -> tf.data.Dataset:
    """The evaluation batches in order.

    Args:
        split: The evaluation split.
        batch_size: Examples per batch (the last batch may be smaller).
        max_batches: At most this many batches; 0 means all.

    Returns:
        A dataset of `(images, labels)`.
    """
    ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels)).batch(batch_size)
    return ds.take(max_batches) if max_batches else ds
