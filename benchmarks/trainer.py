"""Benchmark (5): the fine-tune trainer's step rate vs `model.fit`.

The same Conv-BN-ReLU network (tfbn BN), data and SGD optimizer, trained
for the same number of steps: once through the trainer's train step
(`tfbn.finetune.train_step.build_train_step`: deferred BN updates,
finite-gradient guard), once through `model.fit`. Reports steps per second.

Run: `python -m benchmarks.trainer [--repeats N] [--steps N] [--smoke]`.
"""

from __future__ import annotations

import time

import keras
import tensorflow as tf

import tfbn
from benchmarks import common
from benchmarks.training_step import conv_bn_relu_network
from tfbn.finetune.train_step import build_train_step
from tfbn.finetune.update_plan import plan_update


def _steps_per_second(run_steps, steps: int) -> float:
    run_steps(2)  # Warm-up: tracing.
    start = time.perf_counter()
    run_steps(steps)
    return steps / (time.perf_counter() - start)


def run(repeats: int = 7, smoke: bool = False, steps: int = 10) -> list[common.Row]:
    """Steps/sec of both loops over `steps` steps, alternated `repeats` times.

    Short alternating rounds spread a shared machine's load bursts over
    both loops.

    Args:
        repeats: Rounds of both loops.
        smoke: A tiny, single-round run for tests.
        steps: Steps per round and loop.

    Returns:
        Rows whose median_ms is the median time per step.
    """
    batch, size, channels = (2, 8, 4) if smoke else (32, 32, 64)
    steps = 2 if smoke else steps
    images = tf.random.normal([batch, size, size, 3])
    labels = tf.random.uniform([batch], 0, 10, tf.int32)
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()

    trainer_model = conv_bn_relu_network((size, size, 3), channels, tfbn.BatchNormalization)
    step = build_train_step(trainer_model, keras.optimizers.SGD(0.01), plan_update(trainer_model))
    iterator = iter(dataset)

    def trainer_steps(count):
        for _ in range(count):
            step(*next(iterator))["loss"].numpy()

    fit_model = conv_bn_relu_network((size, size, 3), channels, tfbn.BatchNormalization)
    fit_model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

    def fit_steps(count):
        fit_model.fit(dataset, steps_per_epoch=count, epochs=1, shuffle=False, verbose=0)

    rates = {"tfbn trainer": [], "model.fit": []}
    for _ in range(1 if smoke else repeats):
        rates["tfbn trainer"].append(_steps_per_second(trainer_steps, steps))
        rates["model.fit"].append(_steps_per_second(fit_steps, steps))
    medians = {name: 1e3 / sorted(values)[len(values) // 2] for name, values in rates.items()}
    notes = {name: f"{1e3 / value:.1f} steps/s" for name, value in medians.items()}
    case = f"{steps} steps, batch {batch}x{size}x{size}, {channels} channels"
    return common.rows_with_ratios("trainer", case, medians, "model.fit", notes)


def main(argv=None) -> None:
    """Runs the benchmark from the command line.

    Args:
        argv: Command-line arguments; None reads `sys.argv`.
    """
    common.run_from_command_line(
        __doc__.splitlines()[0], run, argv, extra_arguments=[("--steps", int, 10)]
    )


if __name__ == "__main__":
    main()
