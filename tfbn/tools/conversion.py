"""Moves BN layers and their state between tfbn, stock Keras and PyTorch.

Conventions side by side (tfbn follows Keras):

| quantity          | tfbn / Keras 3                       | PyTorch `nn.BatchNorm*d`       |
|-------------------|--------------------------------------|--------------------------------|
| scale, offset     | `gamma`, `beta`                      | `weight`, `bias`               |
| moving statistics | `moving_mean`, `moving_variance`     | `running_mean`, `running_var`  |
| update rule       | `m = mom * m + (1 - mom) * batch`    | `m = (1 - mom) * m + mom * batch` |
| default momentum  | 0.99; tfbn momentum = 1 - torch's    | 0.1                            |
| cumulative mean   | `momentum=None`, num_batches_tracked | `momentum=None`, same counter  |
| stored variance   | biased (Keras, tfbn default) or      | unbiased (`n / (n - 1)`)       |
|                   | tfbn `moving_variance_estimator="unbiased"` |                         |
| default epsilon   | 1e-3                                 | 1e-5                           |
| channel axis      | `axis=-1` (channels last)            | dim 1 (channels first)         |

Both frameworks normalize with the stored variance as is at inference, so
`running_var` loads unchanged; only future updates depend on the estimator.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import keras
import numpy as np

from tfbn.layers import introspection
from tfbn.layers.batch_normalization import BatchNormalization as TfbnBatchNormalization

_TARGETS = ("tfbn", "keras")
# Config keys of tfbn's layer that stock Keras does not take.
_TFBN_ONLY_KEYS = ("moving_variance_estimator", "virtual_batch_size", "fused")


def keras_momentum(torch_momentum: float | None) -> float | None:
    """The Keras/tfbn momentum of a PyTorch BN momentum: `1 - torch_momentum`.

    PyTorch weighs the *batch* by its momentum, Keras the *moving* value;
    None (a cumulative average) is None in both.

    Args:
        torch_momentum: A PyTorch `nn.BatchNorm*d` momentum, or None.

    Returns:
        The equivalent `momentum` of `tfbn.BatchNormalization`, or None.
    """
    return None if torch_momentum is None else 1.0 - float(torch_momentum)


def convert_batch_norm(model, to: str):
    """Clones `model`, replacing each BN layer by the other implementation.

    Every other layer is cloned too and all weights (moving statistics
    included) are copied: inference outputs are bit-identical to the
    original's; training-mode outputs agree to float32 rounding (tfbn takes
    batch moments with a shifted two-pass formula). Nested Functional and
    Sequential models are converted as well.

    Args:
        model: A Functional or Sequential Keras model.
        to: `"tfbn"` (stock Keras BN -> `tfbn.BatchNormalization`) or
            `"keras"` (tfbn BN -> `keras.layers.BatchNormalization`).

    Returns:
        The converted model.

    Raises:
        ValueError: For an unknown `to`, or when converting to Keras a tfbn
            layer that uses a feature Keras lacks (several axes,
            `momentum=None`, the unbiased estimator, `virtual_batch_size`).
    """
    if to not in _TARGETS:
        raise ValueError(f"`to` must be one of {_TARGETS}; received {to!r}.")
    source = keras.layers.BatchNormalization if to == "tfbn" else TfbnBatchNormalization
    if to == "keras":
        for layer in introspection.batch_norm_layers(model):
            if isinstance(layer, TfbnBatchNormalization):
                _check_keras_compatible(layer)
    copies = []

    def clone_function(layer):
        if type(layer) is source:  # Subclasses may change semantics; clone them.
            clone = _converted(layer, to)
        else:
            clone = layer.__class__.from_config(layer.get_config())
        copies.append((layer, clone))
        return clone

    converted = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    for original, clone in copies:
        clone.set_weights(original.get_weights())
    return converted


def _check_keras_compatible(layer) -> None:
    unsupported = []
    if not isinstance(layer.axis, int) and len(layer.axis) > 1:
        unsupported.append(f"axis={layer.axis!r} (Keras takes one axis)")
    if layer.momentum is None:
        unsupported.append("momentum=None (Keras has no cumulative average)")
    if introspection.variance_estimator(layer) != "biased":
        unsupported.append("moving_variance_estimator='unbiased' (Keras stores the biased one)")
    if layer.virtual_batch_size is not None:
        unsupported.append(f"virtual_batch_size={layer.virtual_batch_size} (no ghost batches)")
    if unsupported:
        raise ValueError(
            f"Cannot convert tfbn layer {layer.path!r} to keras.layers.BatchNormalization: "
            f"it uses {'; '.join(unsupported)}. Keep it as tfbn, or rebuild it "
            "without these features."
        )


def _converted(layer, to: str):
    config = layer.get_config()
    if to == "keras":
        for key in _TFBN_ONLY_KEYS:
            config.pop(key)
        if not isinstance(config["axis"], int):
            config["axis"] = config["axis"][0]
        return keras.layers.BatchNormalization.from_config(config)
    return TfbnBatchNormalization.from_config(config)


def load_torch_batch_norm_state(
    layer,
    state_dict: Mapping[str, object],
    torch_momentum: float | None = 0.1,
    torch_eps: float = 1e-5,
    prefix: str = "",
) -> None:
    """Loads a PyTorch `nn.BatchNorm*d` state dict into a built BN layer.

    Mapping: `weight -> gamma`, `bias -> beta`, `running_mean -> moving_mean`,
    `running_var -> moving_variance` (unchanged: PyTorch stores the unbiased
    variance and uses it as is at inference), `num_batches_tracked ->
    num_batches_tracked` (tfbn layers with `momentum=None` only; otherwise
    PyTorch only uses it for `momentum=None` and it is dropped).

    The layer must already use the matching conventions, so that it computes
    what the PyTorch module computed: `epsilon == torch_eps` and
    `momentum == 1 - torch_momentum` (or both None for a cumulative average).
    For training to continue exactly as in PyTorch, use a tfbn layer with
    `moving_variance_estimator="unbiased"`; a biased layer gets a warning.
    PyTorch puts channels on dim 1, so give channels_first Keras layers
    `axis=1`, or transpose the data.

    Args:
        layer: A built `tfbn.BatchNormalization` or
            `keras.layers.BatchNormalization` with a single feature axis.
        state_dict: Maps names to NumPy arrays (or anything `np.asarray`
            accepts; CPU torch tensors work after `.detach()`).
        torch_momentum: The PyTorch module's `momentum` (None: cumulative).
        torch_eps: The PyTorch module's `eps`.
        prefix: Prefix of the keys, e.g. `"layer1.0.bn1."`.

    Raises:
        ValueError: For an unbuilt layer, mismatched conventions, missing or
            unexpected keys, or shapes that do not match the layer.
        TypeError: For a layer that is not a BN layer.
    """
    if not introspection.is_batch_norm(layer):
        raise TypeError(f"`layer` must be a BatchNormalization layer; received {layer!r}.")
    if not layer.built:
        raise ValueError(
            f"Layer {layer.name!r} is not built; call layer.build(input_shape) "
            "(or the model on data) before loading a state dict."
        )
    if len(introspection.param_shape(layer)) != 1:
        raise ValueError(
            f"Layer {layer.name!r} normalizes several axes ({layer.axis!r}); a PyTorch "
            "BN has one channel axis. Use a single-axis layer."
        )
    expected_momentum = keras_momentum(torch_momentum)
    if (layer.momentum is None) != (expected_momentum is None) or (
        expected_momentum is not None and not np.isclose(layer.momentum, expected_momentum)
    ):
        raise ValueError(
            f"Layer {layer.name!r} has momentum={layer.momentum!r}, but torch_momentum="
            f"{torch_momentum!r} means momentum={expected_momentum!r} here (Keras "
            "momentum = 1 - PyTorch momentum). Build the layer with that momentum."
        )
    if not np.isclose(layer.epsilon, torch_eps, rtol=1e-6, atol=0.0):
        raise ValueError(
            f"Layer {layer.name!r} has epsilon={layer.epsilon!r} but torch_eps={torch_eps!r}; "
            "outputs would differ. Build the layer with epsilon=torch_eps."
        )
    targets = {"running_mean": layer.moving_mean, "running_var": layer.moving_variance}
    if layer.scale:
        targets["weight"] = layer.gamma
    if layer.center:
        targets["bias"] = layer.beta
    tracked = getattr(layer, "num_batches_tracked", None)
    names = {key[len(prefix) :] for key in state_dict if key.startswith(prefix)}
    missing = sorted(set(targets) - names)
    unexpected = sorted(names - set(targets) - {"num_batches_tracked"})
    if missing or unexpected:
        raise ValueError(
            f"State dict for layer {layer.name!r} (prefix {prefix!r}): missing keys "
            f"{missing}, unexpected keys {unexpected}. PyTorch modules built with "
            "affine=False need a layer with center=False and scale=False; "
            "track_running_stats=False modules have no statistics to load."
        )
    values = {}
    for name, variable in targets.items():
        value = np.asarray(state_dict[prefix + name], dtype=np.float32)
        if value.size != int(np.prod(variable.shape)) or value.ndim != 1:
            raise ValueError(
                f"`{prefix + name}` has shape {value.shape}, but layer {layer.name!r} "
                f"needs a vector of {int(np.prod(variable.shape))} values."
            )
        values[name] = value.reshape(variable.shape)
    for name, variable in targets.items():
        variable.assign(values[name])
    if tracked is not None and prefix + "num_batches_tracked" in state_dict:
        tracked.assign(int(np.asarray(state_dict[prefix + "num_batches_tracked"])))
    if introspection.variance_estimator(layer) == "biased":
        warnings.warn(
            f"Layer {layer.name!r} stores the biased moving variance while PyTorch "
            "stores the unbiased one: inference is identical, but further training "
            "updates differ. Use tfbn.BatchNormalization(moving_variance_estimator="
            "'unbiased') to match PyTorch exactly.",
            stacklevel=2,
        )
