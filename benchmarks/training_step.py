"""Benchmark (3): an end-to-end Conv-BN-ReLU training step.

Six Conv2D(3x3, no bias) -> BN -> ReLU blocks, global pooling and a Dense
head, one SGD step (forward, loss, gradients, update, moving statistics) in a
`tf.function`. The same network is timed with `tfbn.BatchNormalization`, with
`keras.layers.BatchNormalization`, and with no BN at all (the conv then has a
bias), interleaved in one process.

Run: `python -m benchmarks.training_step [--repeats N] [--smoke]`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

import tfbn
from benchmarks import common

_BLOCKS = 6


def conv_bn_relu_network(input_shape, channels: int, batch_norm) -> keras.Model:
    """The benchmark network; `batch_norm` is a BN class or None."""
    inputs = keras.Input(input_shape)
    x = inputs
    for _ in range(_BLOCKS):
        x = keras.layers.Conv2D(channels, 3, padding="same", use_bias=batch_norm is None)(x)
        if batch_norm is not None:
            x = batch_norm()(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def make_train_step(model: keras.Model):
    """One SGD step of `model` on (images, labels) as a `tf.function`."""
    optimizer = keras.optimizers.SGD(0.01)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    return step


def run(repeats: int = 7, smoke: bool = False) -> list[common.Row]:
    """Times the three networks; ratios relative to the stock-BN network."""
    batch, size, channels = (2, 8, 4) if smoke else (32, 32, 64)
    images = tf.random.normal([batch, size, size, 3])
    labels = tf.random.uniform([batch], 0, 10, tf.int32)
    contenders = {}
    for name, batch_norm in (
        ("tfbn BN", tfbn.BatchNormalization),
        ("stock keras BN", keras.layers.BatchNormalization),
        ("no BN", None),
    ):
        step = make_train_step(conv_bn_relu_network((size, size, 3), channels, batch_norm))
        contenders[name] = lambda step=step: step(images, labels)
    medians = common.time_interleaved(contenders, repeats)
    case = f"6x Conv-BN-ReLU train step, batch {batch}x{size}x{size}, {channels} channels"
    # The ratio to "no BN" is judged by benchmarks.targets.
    return common.rows_with_ratios("training_step", case, medians, "stock keras BN")


def main(argv=None) -> None:
    common.run_from_command_line(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    main()
