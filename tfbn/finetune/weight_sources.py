"""Weights to restore from, by nested path: `.keras` files, `.weights.h5` files, TF1 checkpoints.

The partial restore (`tfbn.finetune.partial_restore.restore_partial`) matches
weights by the nested layer path of `tfbn.layers.introspection`
(`backbone/bn1/gamma`). Besides the trainer's own checkpoints, this module
reads three foreign sources into `{path: array}`:

* a `.keras` file: the saved model is loaded and its weights are named by
  their nested paths, so any architecture works and `restore_part` /
  `restore_exclude` pick what fits (a pretrained backbone, a new head);
* a `.weights.h5` file (`model.save_weights`): Keras stores these weights
  by position in the architecture, without names, so they load only into
  the architecture that saved them. They are loaded into a fresh copy of
  the model being restored and then named by its nested paths;
* a TF1 name-based checkpoint (`tf.compat.v1.train.Saver`, recognised by
  the absence of the `_CHECKPOINTABLE_OBJECT_GRAPH` key). Its variable
  names are scope paths already and map onto nested paths as they are
  (`backbone/bn1/gamma`, `.../beta`, `.../moving_mean`,
  `.../moving_variance`, `conv1/kernel`, `fc/bias`), with three renames of
  the last component (`TF1_RENAMES`: slim's `weights` and `biases`, and
  `depthwise_kernel`, which Keras 3 calls `kernel`). Optimizer slots and
  bookkeeping (`global_step`, `.../Momentum`, `.../Adam`, `beta1_power`,
  ...) are left out (`is_tf1_bookkeeping`).
"""

from __future__ import annotations

import re
import warnings

import keras
import numpy as np
import tensorflow as tf

from tfbn.finetune.checkpoint import OBJECT_GRAPH_KEY
from tfbn.layers import introspection
from tfbn.models import model_file

WEIGHTS_SUFFIX = ".weights.h5"
# TF1 / slim weight names that Keras 3 layers call differently.
TF1_RENAMES = {"weights": "kernel", "biases": "bias", "depthwise_kernel": "kernel"}
# Optimizer slots and training bookkeeping of TF1 checkpoints: never model weights.
_TF1_BOOKKEEPING = re.compile(
    r"(^|/)(global_step|beta1_power|beta2_power|"
    r"Momentum|Adam|Adam_1|RMSProp|RMSProp_1|Adagrad|Ftrl|Ftrl_1|ExponentialMovingAverage)$"
)


def is_weights_file(source: str) -> bool:
    """Whether `source` names a `.keras` or `.weights.h5` file (not a TF checkpoint).

    Args:
        source: The `init_checkpoint` value.

    Returns:
        True for the two Keras file formats.
    """
    return model_file.is_model_file(source) or source.endswith(WEIGHTS_SUFFIX)


def read_weights_file(source: str, model: keras.Model | None = None) -> dict[str, np.ndarray]:
    """The weights of a `.keras` or `.weights.h5` file by nested path.

    Args:
        source: The file.
        model: The model to restore into: the architecture a `.weights.h5`
            file is read with (ignored for `.keras` files).

    Returns:
        `{nested path: value}`.

    Raises:
        ValueError: If the file does not exist or does not load, or a
            `.weights.h5` file does not fit `model`'s architecture.
    """
    if not tf.io.gfile.exists(source):
        raise ValueError(f"`init_checkpoint` {source!r} does not exist.")
    if model_file.is_model_file(source):
        loaded = model_file.load_model_file(source, argument="init_checkpoint")
    else:
        loaded = _load_weights_into_copy(source, model)
    return {
        path: np.array(keras.ops.convert_to_numpy(variable.value))
        for path, variable in introspection.nested_variable_paths(loaded).items()
    }


def _load_weights_into_copy(source: str, model: keras.Model | None) -> keras.Model:
    if model is None:
        raise ValueError(
            f"`init_checkpoint` {source!r} is a .weights.h5 file, which holds weights "
            "without names; pass the model to restore into so that its architecture "
            "reads them."
        )
    try:
        copy = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    except (TypeError, ValueError, NotImplementedError) as error:
        raise ValueError(
            f"`init_checkpoint` {source!r}: model {model.name!r} cannot be copied to read "
            f"a .weights.h5 file ({str(error)[:200]}). Save the source model as a .keras "
            "file and pass that instead."
        ) from None
    if not copy.built:
        copy.build(model.input_shape)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            copy.load_weights(source)
        # Keras only warns when it skips a part of the file or of the model, and
        # the skipped layers keep fresh random weights: never restore those.
        skipped = [str(w.message) for w in caught if "Skipping" in str(w.message)]
        if skipped:
            raise ValueError(skipped[0])
    except (ValueError, KeyError, OSError) as error:
        raise ValueError(
            f"`init_checkpoint` {source!r} does not fit model {model.name!r}: "
            f"{str(error).splitlines()[0][:300]}. A .weights.h5 file stores weights by "
            "position in the architecture that saved it, not by name, so it loads only "
            "into that architecture. Save the source model as a .keras file "
            "(model.save('source.keras')) and pass that: its weights are matched by path, "
            "and `restore_exclude` leaves out what differs (e.g. a new head)."
        ) from None
    return copy


def is_tf1_checkpoint(prefix: str) -> bool:
    """Whether checkpoint `prefix` is name-based (TF1 `Saver`), without an object graph.

    Args:
        prefix: A readable checkpoint prefix.

    Returns:
        True when it has no `_CHECKPOINTABLE_OBJECT_GRAPH` key.
    """
    return not tf.train.load_checkpoint(prefix).has_tensor(OBJECT_GRAPH_KEY)


def is_tf1_bookkeeping(name: str) -> bool:
    """Whether a TF1 checkpoint name is an optimizer slot or step counter, not a weight.

    Args:
        name: A TF1 variable name (`backbone/bn1/gamma/Momentum`).

    Returns:
        True for bookkeeping.
    """
    return bool(_TF1_BOOKKEEPING.search(name))


def tf1_name_to_path(name: str) -> str:
    """The nested path a TF1 variable name maps to (see the module docstring).

    Args:
        name: A TF1 variable name, with or without `:0`.

    Returns:
        The path: the name with its last component renamed by `TF1_RENAMES`.
    """
    name = name.split(":", 1)[0]
    scope, _, last = name.rpartition("/")
    last = TF1_RENAMES.get(last, last)
    return f"{scope}/{last}" if scope else last


def read_tf1_checkpoint(prefix: str) -> dict[str, np.ndarray]:
    """The model weights of a TF1 name-based checkpoint, by nested path.

    Args:
        prefix: The checkpoint prefix.

    Returns:
        `{path: value}` without optimizer slots and bookkeeping.

    Raises:
        ValueError: If two TF1 names map onto the same path.
    """
    reader = tf.train.load_checkpoint(prefix)
    values: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for name in sorted(reader.get_variable_to_shape_map()):
        if is_tf1_bookkeeping(name):
            continue
        path = tf1_name_to_path(name)
        if path in values:
            raise ValueError(
                f"`init_checkpoint` {prefix!r}: TF1 variables {sources[path]!r} and {name!r} "
                f"both map onto {path!r}; restore one of them by hand."
            )
        values[path] = np.asarray(reader.get_tensor(name))
        sources[path] = name
    return values
