"""Benchmark (6): BN's share of whole-model training steps (ResNet50, MobileNetV2).

`keras.applications` models (`weights=None`) are trained for one SGD step
(forward, loss, gradients, update, moving statistics) in a `tf.function`,
four ways in one process, interleaved: with the stock Keras BN layers, with
them converted by `tfbn.convert_batch_norm`, with every BN layer replaced by
a pass-through ("no BN", the floor BN's cost is measured against), and with
every BN layer replaced by a bare `FusedBatchNormV3` call ("fused kernel
only": batch statistics, no moving statistics, no guard), which shows how
much of BN's cost is the kernel itself and how much is tfbn's around it.

Run: `python -m benchmarks.models [--repeats N] [--smoke]`.
"""

from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf

import tfbn
from benchmarks import common
from benchmarks.training_step import make_train_step

_CLASSES = 10


class PassThrough(keras.layers.Layer):
    """Returns its input; stands in for a BN layer (same call signature)."""

    def call(self, inputs, training=None, mask=None):
        return inputs


class FusedKernelOnly(keras.layers.Layer):
    """Training-mode `FusedBatchNormV3` on channels-last inputs, nothing else.

    The floor of any BN built on the fused kernel: gamma and beta are
    trained, the batch statistics are computed and dropped.
    """

    def __init__(self, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = (input_shape[-1],)
        self.gamma = self.add_weight(shape=channels, initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=channels, initializer="zeros", name="beta")

    def call(self, inputs, training=None, mask=None):
        empty = tf.zeros([0])
        return tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=self.gamma,
            offset=self.beta,
            mean=empty,
            variance=empty,
            epsilon=self.epsilon,
            exponential_avg_factor=1.0,
            data_format="NHWC",
            is_training=True,
        ).y


def replace_batch_norm(model: keras.Model, replacement) -> keras.Model:
    """A clone of `model` with every stock BN layer replaced.

    Args:
        model: A Functional model with channels-last stock BN layers.
        replacement: `replacement(layer) -> keras.layers.Layer`.

    Returns:
        The clone (fresh weights for every layer).
    """

    def clone_function(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            return replacement(layer)
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone_function)


def without_batch_norm(model: keras.Model) -> keras.Model:
    """A clone of `model` with every stock BN layer replaced by a pass-through."""
    return replace_batch_norm(model, lambda layer: PassThrough(name=layer.name))


def tiny_residual_network(shape) -> keras.Model:
    """Conv-BN-ReLU, Conv-BN, add, ReLU, a head: the smoke run's stand-in model."""
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    branch = keras.layers.Conv2D(4, 3, padding="same")(x)
    branch = keras.layers.BatchNormalization()(branch)
    x = keras.layers.ReLU()(keras.layers.Add()([x, branch]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(_CLASSES)(x))


def _applications(smoke: bool):
    """(case name, builder(input_shape) -> stock-BN model), the models timed."""

    # Logits out (no softmax): the step's loss takes logits.
    def resnet50(shape):
        return keras.applications.ResNet50(
            weights=None, input_shape=shape, classes=_CLASSES, classifier_activation=None
        )

    def mobilenet_v2(shape):
        return keras.applications.MobileNetV2(
            weights=None,
            input_shape=shape,
            classes=_CLASSES,
            alpha=0.5,
            classifier_activation=None,
        )

    if smoke:
        return [("tiny residual network", tiny_residual_network)]
    return [("ResNet50", resnet50), ("MobileNetV2 (alpha 0.5)", mobilenet_v2)]


def run(repeats: int = 7, smoke: bool = False) -> list[common.Row]:
    """Times each model with tfbn, stock BN, no BN and the bare kernel.

    Args:
        repeats: Timed steps per contender.
        smoke: One tiny case (`tiny_residual_network` on 2 images of 8x8).

    Returns:
        One row per (model, contender), ratios relative to "no BN".
    """
    batch, size = (2, 8) if smoke else (32, 64)
    images = tf.random.normal([batch, size, size, 3])
    labels = tf.random.uniform([batch], 0, _CLASSES, tf.int32)
    rows = []
    for name, build in _applications(smoke):
        keras.utils.set_random_seed(0)
        stock = build((size, size, 3))
        models = {
            "tfbn": tfbn.convert_batch_norm(stock, to="tfbn"),
            "stock keras BN": stock,
            "no BN": without_batch_norm(stock),
            "fused kernel only": replace_batch_norm(
                stock, lambda layer: FusedKernelOnly(layer.epsilon, name=layer.name)
            ),
        }
        contenders = {}
        for contender, model in models.items():
            step = make_train_step(model)
            contenders[contender] = lambda step=step: step(images, labels)
        wall, cpu = time_rounds(contenders, repeats)
        medians = {contender: float(np.median(times)) for contender, times in wall.items()}
        notes = {}
        for contender in contenders:
            wall_ratios = np.asarray(wall[contender]) / np.asarray(wall["no BN"])
            cpu_ratio = np.median(cpu[contender]) / np.median(cpu["no BN"])
            low, high = np.percentile(wall_ratios, [25, 75])
            notes[contender] = (
                f"per-round ratio IQR {low:.2f}-{high:.2f}; CPU-time ratio {cpu_ratio:.2f}"
            )
        case = f"{name} train step, batch {batch}x{size}x{size}"
        rows += common.rows_with_ratios("models", case, medians, "no BN", notes)
    return rows


def time_rounds(contenders, repeats: int, warmup: int = 2):
    """Wall and process CPU milliseconds of each call, contenders in turn.

    `common.time_interleaved` keeps only medians; here each round's times are
    kept so that the spread of the per-round ratios (one round runs every
    contender once, under nearly the same load) can be reported, and the
    process CPU time, which other processes on a shared machine disturb far
    less than wall time.

    Args:
        contenders: Name -> zero-argument callable returning a tensor.
        repeats: Rounds.
        warmup: Untimed calls per contender first.

    Returns:
        `(wall, cpu)`: name -> list of milliseconds, one per round.
    """
    for function in contenders.values():
        for _ in range(warmup):
            function().numpy()
    wall = {name: [] for name in contenders}
    cpu = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, function in contenders.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            function().numpy()
            cpu[name].append((time.process_time() - cpu_start) * 1e3)
            wall[name].append((time.perf_counter() - wall_start) * 1e3)
    return wall, cpu


def main(argv=None) -> None:
    common.run_from_command_line(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    main()
