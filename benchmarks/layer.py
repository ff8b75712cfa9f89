"""Benchmarks (1) and (2): the layer alone, and its achieved memory bandwidth.

Contenders, timed interleaved in one process: `tfbn.BatchNormalization`
(default `fused=None`), `keras.layers.BatchNormalization`, and the raw
`FusedBatchNormV3` op with its own moving-average update. "fwd" is a
training-mode call including the moving-statistics update; "fwd+bwd" adds the
gradients with respect to the input, gamma and beta. A copy-like pass over
the input (`tf.negative`: read x, write a tensor of its size) is timed in
the same run: GB/s counts the bytes that must move (fwd:
read x, write y; fwd+bwd: also read x and dy, write dx) and "of copy" relates
that rate to the copy's.

Run: `python -m benchmarks.layer [--repeats N] [--smoke]`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

import tfbn
from benchmarks import common

SHAPES = [(256, 14, 14, 256), (32, 56, 56, 128), (1024, 1024)]
GENERAL_SHAPE = (64, 14, 14, 256)
SMOKE_SHAPE = (4, 3, 3, 8)
_MOMENTUM = 0.99


class RawFusedOp:
    """The raw kernel with the moving averages it updates itself."""

    def __init__(self, channels: int):
        self.gamma = tf.Variable(tf.ones([channels]))
        self.beta = tf.Variable(tf.zeros([channels]))
        self.moving_mean = tf.Variable(tf.zeros([channels]), trainable=False)
        self.moving_variance = tf.Variable(tf.ones([channels]), trainable=False)
        self.trainable_variables = [self.gamma, self.beta]

    def __call__(self, x, training=True):
        shape = tf.shape(x)
        x4 = tf.reshape(x, [-1, 1, 1, x.shape[-1]]) if x.shape.rank == 2 else x
        outputs = tf.raw_ops.FusedBatchNormV3(
            x=x4,
            scale=self.gamma,
            offset=self.beta,
            mean=self.moving_mean,
            variance=self.moving_variance,
            epsilon=1e-3,
            exponential_avg_factor=1.0 - _MOMENTUM,
            data_format="NHWC",
            is_training=training,
        )
        if training:
            self.moving_mean.assign(outputs.batch_mean)
            self.moving_variance.assign(outputs.batch_variance)
        return tf.reshape(outputs.y, shape)


def _forward(layer, x, **kwargs):
    return lambda: layer(x, training=True, **kwargs)


def _forward_backward(layer, x, dy, **kwargs):
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, **kwargs)
        return tape.gradient(y, [x] + list(layer.trainable_variables), output_gradients=dy)

    return step


def _inference(layer, x):
    return lambda: layer(x, training=False)


def _copy_pass(x):
    return tf.function(lambda: tf.negative(x))


def _compile(function, jit_compile):
    return tf.function(function, jit_compile=jit_compile)


def _built(layer, shape):
    layer.build(shape)
    return layer


def run(repeats: int = 7, smoke: bool = False) -> list[common.Row]:
    """Times every case; returns the rows (ratios relative to keras)."""
    shapes = [SMOKE_SHAPE] if smoke else SHAPES
    general_shape = SMOKE_SHAPE if smoke else GENERAL_SHAPE
    modes = [("function", False)] if smoke else [("function", False), ("xla", True)]
    rows: list[common.Row] = []
    for shape in shapes:
        x = tf.random.normal(shape, 1.0, 2.0)
        dy = tf.random.normal(shape)
        nbytes = x.shape.num_elements() * 4
        # One elementwise op reading x and writing a tensor of its size: the
        # cheapest full pass TF can run, i.e. the copy bandwidth it reaches.
        copy = _copy_pass(x)
        for mode, jit in modes:
            for pass_name, make, bytes_moved in (
                ("fwd", lambda layer, x=x: _forward(layer, x), 2 * nbytes),
                ("fwd+bwd", lambda layer, x=x, dy=dy: _forward_backward(layer, x, dy), 5 * nbytes),
            ):
                contenders = {
                    "tfbn": _compile(
                        make(_built(tfbn.BatchNormalization(momentum=_MOMENTUM), shape)), jit
                    ),
                    "keras": _compile(
                        make(_built(keras.layers.BatchNormalization(momentum=_MOMENTUM), shape)),
                        jit,
                    ),
                    "raw fused op": _compile(make(RawFusedOp(shape[-1])), jit),
                    "copy": copy,
                }
                medians = common.time_interleaved(contenders, repeats)
                copy_rate = 2 * nbytes / medians["copy"] / 1e6
                notes = {
                    name: f"{bytes_moved / medians[name] / 1e6:.1f} GB/s = "
                    f"{bytes_moved / medians[name] / 1e6 / copy_rate:.0%} of copy"
                    for name in ("tfbn", "keras", "raw fused op")
                }
                notes["copy"] = f"{copy_rate:.1f} GB/s (read + write)"
                case = f"{'x'.join(map(str, shape))} {pass_name} {mode}"
                rows += common.rows_with_ratios("layer", case, medians, "keras", notes)

    # Inference (training=False), tf.function.
    shape = shapes[0]
    x = tf.random.normal(shape, 1.0, 2.0)
    contenders = {
        "tfbn": _compile(_inference(_built(tfbn.BatchNormalization(), shape), x), False),
        "keras": _compile(_inference(_built(keras.layers.BatchNormalization(), shape), x), False),
        "raw fused op": _compile(_inference(RawFusedOp(shape[-1]), x), False),
    }
    medians = common.time_interleaved(contenders, repeats)
    rows += common.rows_with_ratios(
        "layer", f"{'x'.join(map(str, shape))} inference function", medians, "keras"
    )

    # General path: configurations the fused kernel cannot take.
    x = tf.random.normal(general_shape, 1.0, 2.0)
    dy = tf.random.normal(general_shape)
    mask = tf.random.uniform(general_shape[:-1]) > 0.2
    cases = {
        "renorm": (
            tfbn.BatchNormalization(renorm=True),
            keras.layers.BatchNormalization(renorm=True),
            {},
        ),
        "ghost (virtual_batch_size=4; keras without)": (
            tfbn.BatchNormalization(virtual_batch_size=4 if not smoke else 2),
            keras.layers.BatchNormalization(),
            {},
        ),
        "mask (keras without)": (
            tfbn.BatchNormalization(),
            keras.layers.BatchNormalization(),
            {"mask": mask},
        ),
    }
    for name, (ours, stock, kwargs) in cases.items():
        _built(ours, general_shape)
        _built(stock, general_shape)
        contenders = {
            "tfbn (general path)": _compile(_forward_backward(ours, x, dy, **kwargs), False),
            "keras": _compile(_forward_backward(stock, x, dy), False),
        }
        medians = common.time_interleaved(contenders, repeats)
        case = f"{'x'.join(map(str, general_shape))} fwd+bwd function, {name}"
        rows += common.rows_with_ratios("layer", case, medians, "keras")
    return rows


def main(argv=None) -> None:
    common.run_from_command_line(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    main()
