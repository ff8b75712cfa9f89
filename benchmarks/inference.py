"""Benchmark (4): inference with BN folded into the convolutions vs unfolded.

The Conv-BN-ReLU network of `benchmarks.training_step` (tfbn BN, statistics
randomized), `model(x, training=False)` in a `tf.function`, against the model
returned by `tfbn.fold_batch_norm` (`tfbn.tools.folding`). Skips with a message when folding is not
available in this checkout.

Run: `python -m benchmarks.inference [--repeats N] [--smoke]`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import tfbn
from benchmarks import common
from benchmarks.training_step import conv_bn_relu_network


def fold_function():
    """`tfbn.fold_batch_norm`, or raises Skipped naming what is missing."""
    try:
        from tfbn.tools.folding import fold_batch_norm
    except ImportError as error:
        raise common.Skipped(
            f"tfbn.tools.folding.fold_batch_norm is not importable ({error})"
        ) from None
    return fold_batch_norm


def run(repeats: int = 7, smoke: bool = False) -> list[common.Row]:
    """Times the unfolded and folded models; ratios relative to unfolded."""
    fold_batch_norm = fold_function()
    batch, size, channels = (2, 8, 4) if smoke else (32, 32, 64)
    model = conv_bn_relu_network((size, size, 3), channels, tfbn.BatchNormalization)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, tfbn.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 1, layer.moving_mean.shape).astype(np.float32))
            layer.moving_variance.assign(
                rng.uniform(0.5, 2, layer.moving_variance.shape).astype(np.float32)
            )
    folded = fold_batch_norm(model)
    images = tf.random.normal([batch, size, size, 3])
    unfolded_call = tf.function(lambda: model(images, training=False))
    folded_call = tf.function(lambda: folded(images, training=False))
    difference = float(tf.reduce_max(tf.abs(unfolded_call() - folded_call())))
    medians = common.time_interleaved({"unfolded": unfolded_call, "folded": folded_call}, repeats)
    case = f"6x Conv-BN-ReLU inference, batch {batch}x{size}x{size}, {channels} channels"
    notes = {"folded": f"max abs difference {difference:.1e}"}
    return common.rows_with_ratios("inference", case, medians, "unfolded", notes)


def main(argv=None) -> None:
    common.run_from_command_line(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    main()
