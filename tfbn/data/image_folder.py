"""Image folders (`<root>/<split>/<class>/*.jpg|png`): listing and checks.

The listing is what the trainer's labels rest on, so it refuses the folders
that would silently train on wrong data:

* hidden entries (names starting with `.`, such as `.ipynb_checkpoints`) are
  neither classes nor images: a hidden directory counted as a class would
  shift every label after it by one;
* a class directory without images is an error (a class the model can never
  learn, and usually a copying accident);
* every split must have exactly the classes of the `train` split (a `Dog`
  directory in `val` next to `dog` in `train` would otherwise be dropped or
  mislabelled), and the error lists both class sets.

Only paths and labels are listed; `FolderExamples` decodes the images on
demand while training (`tfbn.data.pipeline` streams them), and an image that
cannot be decoded is reported with its path by `unreadable_image`.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
CLASS_SOURCE_SPLIT = "train"
LAYOUT = "<root>/<split>/<class>/*.jpg"


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """The images of one split of an image folder.

    Attributes:
        paths: The image paths, sorted by class then file name.
        labels: int32 `[N]`, the class index of each path.
        class_names: The class names, indexed by label.
    """

    paths: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]


def is_hidden(name: str) -> bool:
    """Whether a directory entry is hidden (`.ipynb_checkpoints`, `.DS_Store`, ...).

    Args:
        name: The entry's name (a trailing `/`, as some filesystems list
            directories, is ignored).

    Returns:
        True for names starting with a dot.
    """
    return name.rstrip("/").startswith(".")


def subdirectories(directory: str) -> list[str]:
    """The sorted names of the visible sub-directories of `directory`.

    Args:
        directory: A directory path (local or any `tf.io.gfile` filesystem).

    Returns:
        The names, hidden ones left out.
    """
    names = (name.rstrip("/") for name in tf.io.gfile.listdir(directory))
    return sorted(
        name
        for name in names
        if not is_hidden(name) and tf.io.gfile.isdir(os.path.join(directory, name))
    )


def _image_files(directory: str) -> list[str]:
    return sorted(
        name
        for name in tf.io.gfile.listdir(directory)
        if not is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)
    )


def list_split(root: str, split: str) -> FolderListing:
    """Lists the images of `<root>/<split>` and checks the folder's classes.

    Args:
        root: The folder's root directory.
        split: The split's sub-directory name.

    Returns:
        The `FolderListing`.

    Raises:
        ValueError: If the split directory does not exist, has no class
            directories, has a class directory without images, or has other
            classes than the `train` split.
    """
    split_dir = os.path.join(root, split)
    if not tf.io.gfile.isdir(split_dir):
        raise ValueError(f"Image folder split {split_dir!r} does not exist (expected {LAYOUT}).")
    class_names = tuple(subdirectories(split_dir))
    if not class_names:
        raise ValueError(
            f"Image folder split {split_dir!r} has no class directories (expected {LAYOUT})."
        )
    train_dir = os.path.join(root, CLASS_SOURCE_SPLIT)
    if split != CLASS_SOURCE_SPLIT and tf.io.gfile.isdir(train_dir):
        train_classes = tuple(subdirectories(train_dir))
        if train_classes != class_names:
            only_train = sorted(set(train_classes) - set(class_names))
            only_here = sorted(set(class_names) - set(train_classes))
            raise ValueError(
                f"Image folder {root!r}: split {split!r} has other classes than "
                f"{CLASS_SOURCE_SPLIT!r}, so its labels would not match. "
                f"{CLASS_SOURCE_SPLIT!r} classes: {list(train_classes)}; {split!r} classes: "
                f"{list(class_names)} (only in {CLASS_SOURCE_SPLIT!r}: {only_train}; only in "
                f"{split!r}: {only_here}). Rename or remove directories so both splits have "
                "the same class names (case matters)."
            )
    paths, labels, empty = [], [], []
    for label, name in enumerate(class_names):
        directory = os.path.join(split_dir, name)
        files = _image_files(directory)
        if not files:
            empty.append(directory)
        paths += [os.path.join(directory, filename) for filename in files]
        labels += [label] * len(files)
    if empty:
        raise ValueError(
            f"Image folder split {split_dir!r}: class directories without images "
            f"({', '.join(IMAGE_EXTENSIONS)}): {empty}. Add images or remove the directories."
        )
    return FolderListing(tuple(paths), np.asarray(labels, np.int32), class_names)


def decode(path, image_size: int):
    """Reads and decodes one image into float32 `[image_size, image_size, 3]` in [0, 1].

    Args:
        path: A scalar string tensor (or str), the image's path.
        image_size: Height and width of the result.

    Returns:
        The image tensor.
    """
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return resize(image, image_size)


def resize(image, image_size: int):
    """Converts a decoded image to float32 in [0, 1], RGB, `image_size` x `image_size`.

    Args:
        image: An integer `[H, W, C]` image (C = 1 or 3).
        image_size: Height and width of the result.

    Returns:
        The float32 `[image_size, image_size, 3]` image.
    """
    image = tf.image.convert_image_dtype(image, tf.float32)
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    return tf.image.resize(image, (image_size, image_size))


def unreadable_image(paths) -> tuple[str, str] | None:
    """The first of `paths` that cannot be read and decoded, with the reason.

    Run only after a decode failure, to name the file: it decodes eagerly.

    Args:
        paths: Image paths to try, in order.

    Returns:
        `(path, reason)`, or None when every image decodes.
    """
    for path in paths:
        try:
            data = tf.io.read_file(path)
            tf.io.decode_image(data, channels=3, expand_animations=False)
        except (tf.errors.OpError, ValueError) as error:
            message = getattr(error, "message", None) or str(error)
            return path, message.strip().splitlines()[0]
    return None


class FolderExamples:
    """Random access to the examples of an image folder split, decoded from their files on demand.

    The example source of a `tfbn.data.pipeline.Split`: only the listing
    (paths and labels) is held in memory.

    Args:
        listing: The split's `FolderListing` (`list_split`).
        image_size: Height and width of the decoded images.
    """

    def __init__(self, listing: FolderListing, image_size: int):
        self.listing = listing
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.listing.paths)

    @property
    def labels(self) -> np.ndarray:
        """int32 `[N]`: every example's label, from the listing."""
        return self.listing.labels

    def examples(self, indices: tf.data.Dataset) -> tf.data.Dataset:
        """Maps example indices to decoded `(image, label)` pairs, in parallel, in order.

        Args:
            indices: Scalar int64 example indices.

        Returns:
            float32 `[H, W, 3]` images in [0, 1] and int32 labels.
        """
        paths = tf.constant(self.listing.paths or ("",), tf.string)
        labels = tf.constant(self.listing.labels, tf.int32)
        size = self.image_size

        def load(index):
            return decode(tf.gather(paths, index), size), tf.gather(labels, index)

        return indices.map(load, num_parallel_calls=tf.data.AUTOTUNE)

    def explain(self, error: tf.errors.OpError, indices) -> ValueError | None:
        """A message naming the first image among `indices` that cannot be decoded.

        Args:
            error: The error the input pipeline raised (unused: the images
                themselves are tried).
            indices: The example indices of the failing batches.

        Returns:
            The ValueError to raise, or None when every image decodes.
        """
        found = unreadable_image(self.listing.paths[int(i)] for i in indices)
        if found is None:
            return None
        path, reason = found
        return ValueError(
            f"Cannot decode image {path!r} ({reason}). Replace the file with a valid "
            f"{'/'.join(IMAGE_EXTENSIONS)} image or remove it."
        )
