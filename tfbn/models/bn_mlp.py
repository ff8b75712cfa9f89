"""A small MLP with BN after every hidden Dense layer, `backbone/` and `head/`."""

from __future__ import annotations

import keras

from tfbn.layers.batch_normalization import BatchNormalization
from tfbn.models.parts import PartsModel, build_part


def bn_mlp(
    num_classes: int,
    input_shape=(32, 32, 3),
    widths=(64, 64),
    head_width: int | None = 32,
    bn_kwargs: dict | None = None,
) -> keras.Model:
    """Builds the model.

    Args:
        num_classes: Number of output logits.
        input_shape: Input shape without the batch axis (flattened).
        widths: Units of the backbone's Dense-BN-ReLU layers.
        head_width: Units of the head's hidden Dense-BN-ReLU layer; None
            puts the logits layer right after the backbone.
        bn_kwargs: Extra arguments of every `tfbn.BatchNormalization`
            (momentum, renorm, virtual_batch_size, ...).

    Returns:
        A `PartsModel` named `bn_mlp` made of the nested sub-models
        `backbone` and `head`.
    """
    bn_kwargs = bn_kwargs or {}

    def backbone(x):
        for index, units in enumerate(widths, start=1):
            x = keras.layers.Dense(units, use_bias=False, name=f"dense{index}")(x)
            x = BatchNormalization(name=f"bn{index}", **bn_kwargs)(x)
            x = keras.layers.ReLU(name=f"relu{index}")(x)
        return x

    def head(x):
        if head_width is not None:
            x = keras.layers.Dense(head_width, use_bias=False, name="fc")(x)
            x = BatchNormalization(name="fc_bn", **bn_kwargs)(x)
            x = keras.layers.ReLU(name="fc_relu")(x)
        return keras.layers.Dense(num_classes, name="logits")(x)

    inputs = keras.Input(input_shape, name="inputs")
    features = keras.layers.Flatten(name="flatten")(inputs)
    backbone_part = build_part("backbone", features.shape[1:], backbone)
    head_part = build_part("head", backbone_part.output.shape[1:], head)
    return PartsModel(inputs, head_part(backbone_part(features)), name="bn_mlp")
