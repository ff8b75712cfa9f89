"""Model builders by name: `"tiny_darknet"` or `"package.module:function"`.

A builder takes `(num_classes, input_shape)` and returns a built Keras model
whose variable paths name its parts (`backbone/...`, `head/...`), the
prefixes that the `update_part` and `restore_part` patterns match. The
`model` config field (and `train.py --model`) takes these names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import keras

from tfbn.layers import introspection
from tfbn.models.bn_mlp import bn_mlp
from tfbn.models.inception_bn import inception_bn
from tfbn.models.tiny_darknet import tiny_darknet

ModelBuilder = Callable[..., keras.Model]

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
) -> keras.Model:
    """Builds a model by name and applies the BN overrides to every BN layer.

    Args:
        name: Registered name or `package.module:function`.
        num_classes: Number of output logits.
        input_shape: Input shape without the batch axis.
        bn_momentum: If not None, the momentum of every BN layer.
        bn_epsilon: If not None, the epsilon of every BN layer.

    Returns:
        The built model.

    Raises:
        ValueError: For an unknown name, a spec that does not import, or a
            builder that does not return a `keras.Model`.
    """
    model = get_builder(name)(num_classes, tuple(input_shape))
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` {name!r} returned {type(model).__name__}, not a keras.Model.")
    if not model.built:
        model(keras.ops.zeros((2,) + tuple(input_shape)), training=False)
    # tfbn and stock Keras BN both read these attributes at call time.
    for layer in introspection.batch_norm_layers(model):
        if bn_momentum is not None:
            layer.momentum = float(bn_momentum)
        if bn_epsilon is not None:
            layer.epsilon = float(bn_epsilon)
    return model
