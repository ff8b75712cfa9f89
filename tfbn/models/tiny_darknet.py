"""A Tiny-Darknet style classifier: Conv-BN-LeakyReLU blocks, `backbone/` and `head/`.

The two parts mirror Tiny-YOLO's `tiny_yolo/backbone` and `yolov3_head`
scopes, so `update_part=["head/"]` is the classic "train only the head".
"""

from __future__ import annotations

import keras

from tfbn.layers.batch_normalization import BatchNormalization
from tfbn.models.parts import PartsModel, build_part


def conv_bn_leaky(x, filters: int, kernel_size: int, name: str):
    """Conv (no bias) -> BN -> LeakyReLU(0.1), the Darknet block.

    Args:
        x: Input tensor.
        filters: Output channels.
        kernel_size: Square kernel side.
        name: Suffix of the block's layer names (`conv<name>`, `bn<name>`).

    Returns:
        The block's output tensor.
    """
    x = keras.layers.Conv2D(
        filters, kernel_size, padding="same", use_bias=False, name=f"conv{name}"
    )(x)
    x = BatchNormalization(name=f"bn{name}")(x)
    return keras.layers.LeakyReLU(negative_slope=0.1, name=f"leaky{name}")(x)


def tiny_darknet(num_classes: int, input_shape=(32, 32, 3), widths=(16, 32, 64)) -> keras.Model:
    """Builds the model.

    Args:
        num_classes: Number of output logits.
        input_shape: `(height, width, channels)`.
        widths: Filters of the backbone's blocks; each block halves the size.

    Returns:
        A `PartsModel` named `tiny_darknet` made of the nested sub-models
        `backbone` and `head` (variable paths `backbone/...`, `head/...`).
    """

    def backbone(x):
        for index, filters in enumerate(widths, start=1):
            x = conv_bn_leaky(x, filters, 3, str(index))
            x = keras.layers.MaxPooling2D(2, name=f"pool{index}")(x)
        return x

    def head(x):
        x = conv_bn_leaky(x, widths[-1], 1, "_head")
        x = keras.layers.Conv2D(num_classes, 1, name="logits_conv")(x)
        return keras.layers.GlobalAveragePooling2D(name="logits")(x)

    inputs = keras.Input(input_shape, name="images")
    backbone_part = build_part("backbone", input_shape, backbone)
    head_part = build_part("head", backbone_part.output.shape[1:], head)
    return PartsModel(inputs, head_part(backbone_part(inputs)), name="tiny_darknet")
