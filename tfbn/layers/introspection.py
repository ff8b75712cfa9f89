"""Uniform read access to tfbn and stock Keras BatchNormalization layers.

The tools, the trainer and the reports treat `tfbn.BatchNormalization` and
`keras.layers.BatchNormalization` alike. This module is the one place that
knows how to find either kind of layer in a model and read its feature axes,
variance convention, inference constants and statistic variables.
"""

from __future__ import annotations

import keras
import numpy as np

from tfbn.layers.batch_normalization import BatchNormalization as TfbnBatchNormalization
from tfbn.nn.batch_norm import STATISTIC_NAMES

BATCH_NORM_TYPES = (TfbnBatchNormalization, keras.layers.BatchNormalization)


def is_batch_norm(layer) -> bool:
    """Whether `layer` is a tfbn or stock Keras BatchNormalization layer."""
    return isinstance(layer, BATCH_NORM_TYPES)


def feature_axes(layer, rank: int) -> list[int]:
    """The layer's feature axes as sorted non-negative ints for inputs of `rank`."""
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    return sorted(axis % rank for axis in axes)


def variance_estimator(layer) -> str:
    """`"biased"` or `"unbiased"`: how the layer stores its moving variance.

    Stock Keras 3 layers store the biased (divide by n) batch variance.
    """
    return getattr(layer, "moving_variance_estimator", "biased")


def param_shape(layer) -> tuple[int, ...]:
    return tuple(layer.moving_mean.shape)


def inference_scale_shift(layer) -> tuple[np.ndarray, np.ndarray]:
    """The per-feature constants of inference mode, `y = x * a + b`, in float64.

    `a = gamma / sqrt(moving_variance + epsilon)` and
    `b = beta - moving_mean * a` (BN's inference transform precomputed once as a scale and a shift);
    a layer without `scale` has gamma 1, one without `center` has beta 0.
    Float64 keeps the folded constants as accurate as float32 allows.
    """
    if not layer.built:
        raise ValueError(
            f"BatchNormalization layer {layer.name!r} is not built, so it has no "
            "statistics yet. Call the model on data (or build it) first."
        )
    mean = np.asarray(layer.moving_mean.numpy(), np.float64)
    variance = np.asarray(layer.moving_variance.numpy(), np.float64)
    gamma = np.asarray(layer.gamma.numpy(), np.float64) if layer.scale else np.ones_like(mean)
    beta = np.asarray(layer.beta.numpy(), np.float64) if layer.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(variance + float(layer.epsilon))
    return scale, beta - mean * scale


def initial_moving_statistics(layer) -> tuple[np.ndarray, np.ndarray]:
    """What the layer's moving mean and variance were initialised to."""
    shape = param_shape(layer)
    mean = layer.moving_mean_initializer(shape, dtype="float32")
    variance = layer.moving_variance_initializer(shape, dtype="float32")
    return np.asarray(mean), np.asarray(variance)


def iter_layers(model) -> list[keras.layers.Layer]:
    """Every layer inside `model` (nested models and sublayers too), each once."""
    if not isinstance(model, keras.layers.Layer):
        return []  # A non-layer operation, e.g. `keras.ops.add`.
    return model._flatten_layers(include_self=False, recursive=True)


def batch_norm_layers(model) -> list[keras.layers.Layer]:
    """The BN layers of `model` (nested ones included), in layer order."""
    return [layer for layer in iter_layers(model) if is_batch_norm(layer)]


def statistic_variables(layer) -> dict[str, keras.Variable]:
    """Every moving statistic the layer keeps, by name, in `STATISTIC_NAMES` order.

    `moving_mean` and `moving_variance` always; with renorm (tfbn or stock)
    also `moving_stddev`, `renorm_mean` and `renorm_stddev`; with a
    cumulative average (`momentum=None`) also `num_batches_tracked`. This is
    what "the statistics stayed bit-identical" and "reset the statistics"
    refer to everywhere in tfbn.
    """
    found = {name: getattr(layer, name, None) for name in STATISTIC_NAMES}
    return {name: variable for name, variable in found.items() if variable is not None}


def state_variables(layer) -> dict[str, keras.Variable]:
    """`gamma` and `beta` (those the layer has), then `statistic_variables(layer)`."""
    affine = {name: getattr(layer, name, None) for name in ("gamma", "beta")}
    state = {name: variable for name, variable in affine.items() if variable is not None}
    state.update(statistic_variables(layer))
    return state


# ------------------------------------------------------------ stable paths
#
# Keras 3 builds `variable.path` from the name scopes active when a variable
# was created, and a saved model is rebuilt without them: `backbone/bn1/gamma`
# of a model built under `keras.name_scope("backbone")` is `bn1/gamma` once the
# `.keras` file is loaded. The nested layer path (the names of the sub-models
# and layers that own a variable, then its name) is rebuilt from the saved
# architecture, so it is the same before and after a save / load. Patterns,
# restores, checkpoints and reports all use it, through these helpers.
#
# Name scopes that a build put in front of the nested path are kept (a flat
# model built under `keras.name_scope("head")` still has `head/logits/kernel`
# while it lives), because that is what TF1-style code names its parts by;
# only real nested parts (sub-models) survive a save and load, which is why
# the bundled models are built of them.


def nested_layer_paths(model) -> dict[int, str]:
    """The nested layer path of every layer inside `model`, by `id(layer)`.

    A layer's path is the names of the sub-models (and layers) that contain
    it, then its own name: `backbone/bn1`. The outer model's name is not part
    of it. A layer reachable twice (shared by two sub-models) keeps its first
    path. As for variables, name scopes of the build in front of the nested
    path are kept.

    Args:
        model: A Keras model or layer.

    Returns:
        `{id(layer): path}`.
    """
    layer_paths: dict[int, str] = {}
    _walk(model, "", layer_paths, {})
    layers = {id(layer): layer for layer in iter_layers(model)}
    return {
        key: _with_build_scopes(path, getattr(layers.get(key), "path", None))
        for key, path in layer_paths.items()
    }


def nested_variable_paths(model) -> dict[str, keras.Variable]:
    """Every variable of `model` by its nested layer path, in `model.variables` order.

    The path is the owning layer's nested path, then the variable's path
    below that layer (`backbone/bn1/moving_mean`); a variable of the outer
    model itself is named by its own name. When the variable's Keras path
    ends with that nested path (name scopes of the build in front of it),
    the Keras path is used, scopes included.

    Args:
        model: A Keras model (built, so that its variables exist).

    Returns:
        `{path: variable}`.

    Raises:
        ValueError: If two variables get the same path (two sibling layers
            with the same name, possible in subclassed models).
    """
    by_id: dict[int, str] = {}
    _walk(model, "", {}, by_id)
    paths: dict[str, keras.Variable] = {}
    for variable in model.variables:
        path = _with_build_scopes(by_id.get(id(variable)), variable.path)
        if path in paths and paths[path] is not variable:
            raise ValueError(
                f"Model {model.name!r}: two variables share the nested path {path!r}; give "
                "the layers unique names so that variables can be matched by path."
            )
        paths[path] = variable
    return paths


def _walk(layer, prefix: str, layer_paths: dict[int, str], variable_paths: dict[int, str]):
    """Fills both lookups for `layer`'s own variables and, recursively, its sublayers."""
    children = _sublayers(layer)
    owned_by_children = {id(v) for child in children for v in child.variables}
    for variable in layer.variables:
        if id(variable) not in owned_by_children and id(variable) not in variable_paths:
            variable_paths[id(variable)] = prefix + _name_below(layer, variable)
    for child in children:
        if id(child) in layer_paths:
            continue
        path = prefix + child.name
        layer_paths[id(child)] = path
        _walk(child, path + "/", layer_paths, variable_paths)


def _with_build_scopes(nested: str | None, keras_path: str | None) -> str:
    """`keras_path` when it is `nested` with name scopes in front, else `nested`."""
    if nested is None:
        return keras_path
    if keras_path and (keras_path == nested or keras_path.endswith("/" + nested)):
        return keras_path
    return nested


def _sublayers(layer) -> list:
    if not isinstance(layer, keras.layers.Layer):
        return []
    return layer._flatten_layers(include_self=False, recursive=False)


def _name_below(layer, variable) -> str:
    """The variable's path below `layer` (`gamma`, `seed_generator/state`)."""
    parts = variable.path.split("/")
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] == layer.name:
            return "/".join(parts[index + 1 :])
    return variable.name
