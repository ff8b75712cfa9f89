"""Saved Keras models as trainer models: `model="path/to/model.keras"`.

A `.keras` file holds the architecture and the weights, so any saved model
(built with tfbn or stock Keras BN, nested or flat, a `keras.applications`
network) can be fine-tuned without writing a builder. Its input size decides
the size the images are resized to (`input_image_size`), read from the
file's architecture without building the model.
"""

from __future__ import annotations

import json
import os
import zipfile

import keras

# Registers the tfbn classes a saved model may contain before it is loaded.
from tfbn.layers import batch_normalization  # noqa: F401
from tfbn.models import parts  # noqa: F401

MODEL_FILE_SUFFIX = ".keras"


def is_model_file(name: str) -> bool:
    """Whether the `model` value names a saved `.keras` file (rather than a builder).

    Args:
        name: The `model` value.

    Returns:
        True when it ends in `.keras`.
    """
    return name.endswith(MODEL_FILE_SUFFIX)


def check_model_file(path: str) -> str | None:
    """Why `path` cannot be a saved model file, or None when it can be.

    Args:
        path: A path ending in `.keras`.

    Returns:
        The problem in a few words, or None.
    """
    if not os.path.isfile(path):
        return f"the file {path} does not exist (a .keras file saved with model.save)"
    if not zipfile.is_zipfile(path):
        return f"{path} is not a .keras archive (save the model with model.save('x.keras'))"
    return None


def load_model_file(path: str, argument: str = "model") -> keras.Model:
    """The model saved in `path`: architecture and weights, without its compile state.

    Args:
        path: A `.keras` file.
        argument: The argument (flag) that named the file, for error messages.

    Returns:
        The loaded model.

    Raises:
        ValueError: If the file does not exist, is not a `.keras` archive, or
            does not load (for example a custom layer that is not importable).
    """
    problem = check_model_file(path)
    if problem:
        raise ValueError(f"`{argument}` {path!r}: {problem}.")
    try:
        model = keras.saving.load_model(path, compile=False)
    except (TypeError, ValueError, OSError) as error:
        raise ValueError(
            f"`{argument}` {path!r} does not load: {str(error)[:400]}. Import the module that "
            "defines its custom layers (decorated with "
            "@keras.saving.register_keras_serializable) before training."
        ) from None
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`{argument}` {path!r} holds a {type(model).__name__}, not a keras.Model."
        )
    return model


def saved_input_shape(path: str) -> tuple | None:
    """The input shape (without the batch axis) stored in a `.keras` file's architecture.

    Reads `config.json` only; builds nothing.

    Args:
        path: A `.keras` file.

    Returns:
        The shape with None for free dimensions, or None when the
        architecture does not record one.
    """
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    inner = config.get("config", {})
    layers = inner.get("layers", [])
    input_names = [entry[0] for entry in _as_list(inner.get("input_layers"))]
    for layer in layers:
        if layer.get("class_name") != "InputLayer":
            continue
        if input_names and layer.get("name") not in input_names:
            continue
        batch_shape = layer.get("config", {}).get("batch_shape")
        if batch_shape:
            return tuple(batch_shape[1:])
    build_shape = inner.get("build_input_shape") or config.get("build_config", {}).get(
        "input_shape"
    )
    return tuple(build_shape[1:]) if build_shape else None


def input_image_size(name: str, default: int) -> int:
    """The image size a run with `model=name` trains on.

    A builder takes any size (`default`, the `image_size` setting); a saved
    model takes the size of its input layer, so the images are resized to it.

    Args:
        name: The `model` value.
        default: The configured `image_size`.

    Returns:
        The square image size.

    Raises:
        ValueError: If the saved model's input is not a square RGB image
            `(size, size, 3)`.
    """
    if not is_model_file(name):
        return default
    problem = check_model_file(name)
    if problem:
        raise ValueError(f"`model` {name!r}: {problem}.")
    shape = saved_input_shape(name)
    if shape is None:
        return default
    if len(shape) != 3:
        raise ValueError(
            f"`model` {name!r} takes inputs of shape {shape}; the trainer feeds images "
            "(height, width, channels). Save a model with an image input."
        )
    height, width, channels = shape
    if channels not in (None, 3):
        raise ValueError(
            f"`model` {name!r} takes {channels}-channel images; the trainer feeds RGB "
            "images (3 channels). Save a model with 3 input channels."
        )
    if height is None and width is None:
        return default
    if height != width:
        raise ValueError(
            f"`model` {name!r} takes {height}x{width} images; the trainer resizes images to "
            "squares. Save the model with a square input_shape."
        )
    return int(height)


def _as_list(value) -> list:
    """`input_layers` is a list of `[name, node, tensor]` or one such triple."""
    if not value:
        return []
    if isinstance(value[0], str):
        return [value]
    return list(value)
