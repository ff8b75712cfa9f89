"""A small Inception-BN (GoogLeNet with batch normalization) for 32x32 inputs.

As in BN-Inception, every convolution is Conv-BN-ReLU and the 5x5 branch is
two 3x3 convolutions. The stem and widths are shrunk for 32x32 images.
"""

from __future__ import annotations

import keras

from tfbn.layers.batch_normalization import BatchNormalization
from tfbn.models.parts import PartsModel, build_part


def conv_bn_relu(x, filters: int, kernel_size: int, name: str, strides: int = 1):
    """Conv (no bias) -> BN -> ReLU, GoogLeNet-BN's basic convolution block.

    Args:
        x: Input tensor.
        filters: Output channels.
        kernel_size: Square kernel side.
        name: Prefix of the block's layer names.
        strides: Convolution strides.

    Returns:
        The block's output tensor.
    """
    x = keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def inception_block(x, widths, name: str):
    """Four branches: 1x1; 1x1-3x3; 1x1-3x3-3x3; 3x3 max-pool-1x1; concatenated.

    Args:
        x: Input tensor.
        widths: `(b1, b2_reduce, b2, b3_reduce, b3, pool_proj)` filters.
        name: Block name, the prefix of its layers.

    Returns:
        The concatenated branches.
    """
    b1, b2_reduce, b2, b3_reduce, b3, pool_proj = widths
    branch1 = conv_bn_relu(x, b1, 1, f"{name}_b1")
    branch2 = conv_bn_relu(x, b2_reduce, 1, f"{name}_b2a")
    branch2 = conv_bn_relu(branch2, b2, 3, f"{name}_b2b")
    branch3 = conv_bn_relu(x, b3_reduce, 1, f"{name}_b3a")
    branch3 = conv_bn_relu(branch3, b3, 3, f"{name}_b3b")
    branch3 = conv_bn_relu(branch3, b3, 3, f"{name}_b3c")
    branch4 = keras.layers.MaxPooling2D(3, strides=1, padding="same", name=f"{name}_pool")(x)
    branch4 = conv_bn_relu(branch4, pool_proj, 1, f"{name}_b4")
    return keras.layers.Concatenate(name=f"{name}_concat")([branch1, branch2, branch3, branch4])


def inception_bn(num_classes: int, input_shape=(32, 32, 3)) -> keras.Model:
    """Builds the model: stem, inception 3a/3b, pool, inception 4a, GAP head.

    Args:
        num_classes: Number of output logits.
        input_shape: `(height, width, channels)`.

    Returns:
        A `PartsModel` named `inception_bn` made of the nested sub-models
        `backbone` and `head`.
    """

    def backbone(x):
        x = conv_bn_relu(x, 32, 3, "stem")
        x = inception_block(x, (16, 16, 24, 8, 12, 8), "inception3a")
        x = inception_block(x, (24, 24, 32, 8, 16, 16), "inception3b")
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool3")(x)
        x = inception_block(x, (32, 24, 40, 8, 16, 16), "inception4a")
        return keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool4")(x)

    def head(x):
        x = conv_bn_relu(x, 64, 1, "proj")
        x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
        return keras.layers.Dense(num_classes, name="logits")(x)

    inputs = keras.Input(input_shape, name="images")
    backbone_part = build_part("backbone", input_shape, backbone)
    head_part = build_part("head", backbone_part.output.shape[1:], head)
    return PartsModel(inputs, head_part(backbone_part(inputs)), name="inception_bn")
