"""Benchmark (7): `recompute_statistics` against compiled inference passes.

`tfbn.tools.population_statistics.recompute_statistics` on a
`keras.applications` network (`weights=None`, stock Keras BN layers, 32x32
images, 4 batches of 16), against the same 4 batches through
`model(x, training=False)` in a `tf.function`. Both are timed warm: the
recompute's first call (which traces one function per BN dependency level)
is timed once and given in the note, next to the first (tracing) call of
the inference passes. The ratio is the recompute's time in inference
passes; the target is in `benchmarks.targets`.

Run: `python -m benchmarks.population_statistics [--repeats N] [--smoke]`.
"""

from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf

from benchmarks import common

_BATCHES = 4


def _applications():
    """(name, builder) of the networks timed; DenseNet121 has 121 BN levels."""
    return (
        ("ResNet50", keras.applications.ResNet50),
        ("DenseNet121", keras.applications.DenseNet121),
    )


def _tiny_network(size):
    inputs = keras.Input((size, size, 3))
    x = inputs
    for channels in (4, 8):
        x = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def recompute_function():
    """`recompute_statistics`, or raises Skipped naming what is missing."""
    try:
        from tfbn.tools.population_statistics import recompute_statistics
    except ImportError as error:
        raise common.Skipped(f"recompute_statistics is not importable ({error})") from None
    return recompute_statistics


def _count_rounds(model) -> str:
    from tfbn.tools import frontier_passes, moment_pools

    plan = frontier_passes.build_plan(model, moment_pools.input_moments)
    return "whole passes" if plan is None else f"{len(plan.rounds)} rounds"


def time_case(name, model, batches, repeats) -> list[common.Row]:
    """Rows for one model: the recompute and the inference passes, warm."""
    recompute_statistics = recompute_function()
    start = time.perf_counter()
    recompute_statistics(model, batches, progress=False)
    cold_ms = (time.perf_counter() - start) * 1e3
    inference = tf.function(lambda x: model(x, training=False))

    def passes():
        return [inference(batch) for batch in batches]

    start = time.perf_counter()
    for output in passes():
        output.numpy()
    cold_passes_ms = (time.perf_counter() - start) * 1e3

    def recompute():
        recompute_statistics(model, batches, progress=False)

    medians = common.time_interleaved(
        {"recompute_statistics": recompute, f"{len(batches)} inference passes": passes},
        repeats,
        warmup=1,
    )
    size = batches[0].shape[1]
    case = f"{name} {size}x{size}, {len(batches)} batches of {len(batches[0])}"
    rounds = _count_rounds(model)
    notes = {
        "recompute_statistics": (
            f"{rounds}; first call (traces them): {cold_ms:.0f} ms, "
            f"{cold_ms / cold_passes_ms:.1f}x the first inference passes"
        ),
        f"{len(batches)} inference passes": f"first call (traces): {cold_passes_ms:.0f} ms",
    }
    return common.rows_with_ratios(
        "population_statistics", case, medians, f"{len(batches)} inference passes", notes
    )


def run(repeats: int = 7, smoke: bool = False) -> list[common.Row]:
    """Times the recompute against inference passes on each network."""
    recompute_function()
    rng = np.random.default_rng(0)
    if smoke:
        batches = [rng.normal(size=(2, 8, 8, 3)).astype(np.float32) for _ in range(2)]
        return time_case("tiny Conv-BN-ReLU x2", _tiny_network(8), batches, repeats)
    batches = [rng.normal(size=(16, 32, 32, 3)).astype(np.float32) for _ in range(_BATCHES)]
    rows = []
    for name, builder in _applications():
        model = builder(weights=None, input_shape=(32, 32, 3), classes=10)
        rows += time_case(name, model, batches, max(1, min(repeats, 5)))
    return rows


def main(argv=None) -> None:
    common.run_from_command_line(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    main()
