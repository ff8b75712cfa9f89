"""Model builders by name: `"tiny_darknet"`, `"package.module:function"` or a `.keras` file.

A builder takes `(num_classes, input_shape)` and returns a built Keras model
whose nested layer paths name its parts (`backbone/...`, `head/...`), the
prefixes that the `update_part` and `restore_part` patterns match. A saved
`.keras` file brings its own architecture and weights (`model_file`). The
`model` config field (and `train.py --model`) takes these names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import keras
from absl import logging

from tfbn.layers import introspection
from tfbn.models.bn_mlp import bn_mlp
from tfbn.models.inception_bn import inception_bn
from tfbn.models.model_file import input_image_size, is_model_file, load_model_file
from tfbn.models.parts import PartsModel
from tfbn.models.tiny_darknet import tiny_darknet

ModelBuilder = Callable[..., keras.Model]

__all__ = [
    "REGISTRY",
    "PartsModel",
    "build_model",
    "check_output_classes",
    "get_builder",
    "input_image_size",
    "is_model_file",
    "load_model_file",
    "output_logits",
]

REGISTRY: dict[str, ModelBuilder] = {
    "tiny_darknet": tiny_darknet,
    "bn_mlp": bn_mlp,
    "inception_bn": inception_bn,
}


def get_builder(name: str) -> ModelBuilder:
    """The builder registered as `name`, or loaded from `package.module:function`.

    Args:
        name: A registered name or a `package.module:function` spec.

    Returns:
        The builder, called as `builder(num_classes, input_shape)`.

    Raises:
        ValueError: For an unknown name or a spec that does not import.
    """
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" not in name:
        raise ValueError(
            f"`model` {name!r} is not registered; use one of {sorted(REGISTRY)} or "
            "'package.module:function'."
        )
    module_name, _, function_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"`model` {name!r}: cannot import {module_name!r} ({error}).") from None
    builder = getattr(module, function_name, None)
    if not callable(builder):
        raise ValueError(f"`model` {name!r}: {module_name} has no function {function_name!r}.")
    return builder


def build_model(
    name: str,
    num_classes: int,
    input_shape,
    bn_momentum: float | None = None,
    bn_epsilon: float | None = None,
    dataset: str | None = None,
) -> keras.Model:
    """Builds (or loads) a model by name, checks its output, applies the BN overrides.

    Args:
        name: Registered name, `package.module:function`, or a `.keras` file
            (architecture and weights from the file).
        num_classes: Number of output logits the data needs (its classes).
        input_shape: Input shape without the batch axis.
        bn_momentum: If not None, the momentum of every BN layer.
        bn_epsilon: If not None, the epsilon of every BN layer.
        dataset: The dataset's name, quoted in the class-count error.

    Returns:
        The built model.

    Raises:
        ValueError: For an unknown name, a spec that does not import, a file
            that does not load, a builder that does not return a
            `keras.Model`, or a model whose output is not `num_classes` logits.
    """
    if is_model_file(name):
        model = load_model_file(name)
    else:
        model = get_builder(name)(num_classes, tuple(input_shape))
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` {name!r} returned {type(model).__name__}, not a keras.Model.")
    if not model.built:
        model(keras.ops.zeros((2,) + tuple(input_shape)), training=False)
    check_output_classes(model, name, num_classes, input_shape, dataset)
    _warn_about_probabilities(model, name)
    # tfbn and stock Keras BN both read these attributes at call time.
    for layer in introspection.batch_norm_layers(model):
        if bn_momentum is not None:
            layer.momentum = float(bn_momentum)
        if bn_epsilon is not None:
            layer.epsilon = float(bn_epsilon)
    return model


def output_logits(model: keras.Model, input_shape) -> int | None:
    """How many logits `model` outputs per example (None: not one `[batch, n]` output).

    Args:
        model: A built model.
        input_shape: Its input shape without the batch axis.

    Returns:
        The size of the last axis of its single rank-2 output, else None.
    """
    outputs = getattr(model, "outputs", None)
    if outputs:
        shapes = [tuple(output.shape) for output in outputs]
    else:
        # A subclassed model: a call in inference mode changes no variable.
        result = model(keras.ops.zeros((2,) + tuple(input_shape)), training=False)
        shapes = [tuple(result.shape)] if hasattr(result, "shape") else []
    if len(shapes) != 1 or len(shapes[0]) != 2 or shapes[0][-1] is None:
        return None
    return int(shapes[0][-1])


def check_output_classes(
    model: keras.Model, name: str, num_classes: int, input_shape, dataset: str | None = None
) -> None:
    """Checks, before the first step, that `model` outputs one logit per class.

    Fewer logits than classes fail deep inside the loss; more train silently
    on logits no label ever selects. Both are refused here.

    Args:
        model: The built model.
        name: The `model` value, quoted in the error.
        num_classes: The number of classes of the data.
        input_shape: The model's input shape without the batch axis.
        dataset: The dataset's name, quoted in the error.

    Raises:
        ValueError: If the output is not `[batch, num_classes]`.
    """
    logits = output_logits(model, input_shape)
    if logits == num_classes:
        return
    data = f"`dataset` {dataset!r}" if dataset else "the dataset"
    if is_model_file(name):
        fix = (
            f"save a model with {num_classes} outputs (for keras.applications: "
            f"classes={num_classes}, classifier_activation=None), or pick the dataset it was "
            "made for"
        )
    else:
        fix = (
            f"make the builder return {num_classes} logits (it receives num_classes="
            f"{num_classes}), or pick the dataset it was made for"
        )
    got = "an output that is not [batch, logits]" if logits is None else f"{logits} logits"
    raise ValueError(
        f"`model` {name!r} outputs {got}, but {data} has {num_classes} classes: {fix}."
    )


def _warn_about_probabilities(model: keras.Model, name: str) -> None:
    """Warns when the model ends in a softmax: the trainer's loss expects logits."""
    last = model.layers[-1] if getattr(model, "layers", None) else None
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    if activation == "softmax":
        logging.warning(
            "`model` %r ends in a softmax (layer %r), but the trainer's loss takes logits; "
            "it still trains, more slowly. Save it with classifier_activation=None "
            "(keras.applications) or without the final softmax.",
            name,
            last.name,
        )
