"""Benchmark (5): the fine-tune trainer's step rate vs `model.fit`, and its input pipeline.

Three measurements, each in one process, contenders interleaved:

* the train step: the same Conv-BN-ReLU network (tfbn BN), data and SGD
  optimizer, trained for the same number of steps through the trainer's
  train step (`tfbn.finetune.train_step.build_train_step`: deferred BN
  updates, finite-gradient guard) and through `model.fit`, on one batch
  held in memory;
* an image folder of generated 64x64 JPEGs, end to end: the trainer's
  streamed pipeline (`tfbn.data.train_batches`: stateless permutation,
  parallel decode, prefetch) feeding its train step, against
  `keras.utils.image_dataset_from_directory` feeding `model.fit`, on the
  same network;
* peak memory of `train.py` training on a generated folder of 1,500 and of
  6,000 64x64 images, each in a fresh subprocess (peak resident set size
  from `os.wait4`): streaming must not grow with the number of images.

Run: `python -m benchmarks.trainer [--repeats N] [--steps N] [--smoke]`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

import tfbn
from benchmarks import common
from benchmarks.training_step import conv_bn_relu_network
from tfbn import data as data_lib
from tfbn.finetune.train_step import build_train_step
from tfbn.finetune.update_plan import plan_update

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER_IMAGE_SIZE = 64
FOLDER_CLASSES = 4
MEMORY_IMAGE_COUNTS = (1500, 6000)


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

    case = f"{steps} steps, batch {batch}x{size}x{size}, {channels} channels"
    loops = {"tfbn trainer": trainer_steps, "model.fit": fit_steps}
    rows = _step_time_rows(case, loops, 1 if smoke else repeats, steps, "model.fit")
    with tempfile.TemporaryDirectory(prefix="tfbn_bench_folder_") as root:
        rows += folder_throughput(root, repeats, smoke, steps)
        rows += peak_memory(root, smoke)
    return rows


def _step_time_rows(case, loops, rounds: int, steps: int, reference: str) -> list[common.Row]:
    """Times `steps` steps of each loop per round, loops interleaved; rows of ms per step.

    Args:
        case: The rows' case.
        loops: Name -> `run_steps(count)`.
        rounds: Timed rounds of every loop.
        steps: Steps per round and loop.
        reference: The loop the ratios are relative to.

    Returns:
        One row per loop: median ms per step, the steps/s in the note.
    """
    rates = {name: [] for name in loops}
    for _ in range(rounds):
        for name, run_steps in loops.items():
            rates[name].append(_steps_per_second(run_steps, steps))
    medians = {name: 1e3 / sorted(values)[len(values) // 2] for name, values in rates.items()}
    notes = {name: f"{1e3 / value:.1f} steps/s" for name, value in medians.items()}
    return common.rows_with_ratios("trainer", case, medians, reference, notes)


def write_image_folder(root: str, train_images: int, size: int = FOLDER_IMAGE_SIZE) -> str:
    """Writes `root/{train,val}/class<k>/*.jpg` of random pixels; returns `folder:<root>`.

    Args:
        root: The folder to create.
        train_images: Images in `train` (spread over `FOLDER_CLASSES` classes);
            `val` gets 8 per class.
        size: Height and width of the images.

    Returns:
        The `--dataset` value of the folder.
    """
    rng = np.random.default_rng(0)
    for split, count in (("train", train_images), ("val", 8 * FOLDER_CLASSES)):
        for index in range(count):
            directory = os.path.join(root, split, f"class{index % FOLDER_CLASSES}")
            os.makedirs(directory, exist_ok=True)
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            tf.io.write_file(os.path.join(directory, f"{index}.jpg"), tf.io.encode_jpeg(pixels))
    return f"folder:{root}"


def folder_throughput(root: str, repeats: int, smoke: bool, steps: int) -> list[common.Row]:
    """Steps/sec on an image folder: the trainer's streamed pipeline vs the Keras one + fit.

    Args:
        root: A scratch directory.
        repeats: Rounds of both loops.
        smoke: A tiny folder and single round, for tests.
        steps: Steps per round and loop.

    Returns:
        Rows whose median_ms is the median time per step; the baseline is
        `image_dataset_from_directory` + `model.fit`.
    """
    batch, channels, images = (4, 4, 16) if smoke else (32, 32, 1500)
    steps = 2 if smoke else steps
    dataset = write_image_folder(os.path.join(root, "throughput"), images)
    size = FOLDER_IMAGE_SIZE
    shape = (size, size, 3)

    split = data_lib.load_split(dataset, "train", size)
    trainer_model = conv_bn_relu_network(shape, channels, tfbn.BatchNormalization)
    step = build_train_step(trainer_model, keras.optimizers.SGD(0.01), plan_update(trainer_model))
    streamed = iter(data_lib.train_batches(split, batch, seed=0, start_step=0, end_step=10**9))

    def trainer_steps(count):
        for _ in range(count):
            step(*next(streamed))["loss"].numpy()

    keras_dataset = keras.utils.image_dataset_from_directory(
        os.path.join(dataset.split(":", 1)[1], "train"),
        image_size=(size, size),
        batch_size=batch,
        seed=0,
        verbose=False,
    )
    keras_dataset = keras_dataset.map(lambda x, y: (x / 255.0, y)).repeat().prefetch(2)
    fit_model = conv_bn_relu_network(shape, channels, tfbn.BatchNormalization)
    fit_model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

    def fit_steps(count):
        fit_model.fit(keras_dataset, steps_per_epoch=count, epochs=1, shuffle=False, verbose=0)

    keras_name = "image_dataset_from_directory + fit"
    case = (
        f"image folder, {images} JPEGs {size}x{size}, {steps} steps, batch {batch}, "
        f"{channels} channels"
    )
    loops = {"tfbn trainer, streamed folder": trainer_steps, keras_name: fit_steps}
    return _step_time_rows(case, loops, 1 if smoke else repeats, steps, keras_name)


def _peak_rss_mb(dataset: str, model_dir: str, steps: int, batch: int) -> float:
    """Peak resident memory (MB) of a `train.py` subprocess training `steps` steps on `dataset`."""
    command = [
        sys.executable,
        os.path.join(REPO, "train.py"),
        f"--flagfile={REPO}/configs/smoke.flags",
        f"--model_dir={model_dir}",
        f"--dataset={dataset}",
        f"--image_size={FOLDER_IMAGE_SIZE}",
        f"--batch_size={batch}",
        f"--train_steps={steps}",
        f"--checkpoint_interval={steps}",
        f"--summary_interval={steps}",
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"train.py failed: {stderr.decode(errors='replace')[-2000:]}")
    return usage.ru_maxrss / 1024.0  # kilobytes on Linux


def peak_memory(root: str, smoke: bool) -> list[common.Row]:
    """Peak memory of training on a small and a 4x larger generated image folder.

    Each run trains one epoch of the larger folder (so every image of both
    folders is read), in its own `train.py` process; 3 alternating runs per
    folder, medians.

    Args:
        root: A scratch directory.
        smoke: Tiny folders and 2 steps, for tests.

    Returns:
        One row: `median_ms` holds the larger run's peak in MB and `ratio`
        the growth in MB (what the memory target judges).
    """
    counts = (16, 64) if smoke else MEMORY_IMAGE_COUNTS
    batch = 8 if smoke else 32
    steps = 2 if smoke else counts[1] // batch
    datasets = [write_image_folder(os.path.join(root, f"memory{count}"), count) for count in counts]
    samples = [[], []]
    # Alternating rounds, as for the timings: the machine's state moves both alike.
    for round_index in range(1 if smoke else 3):
        for position, (count, dataset) in enumerate(zip(counts, datasets)):
            model_dir = os.path.join(root, f"run{count}_{round_index}")
            samples[position].append(_peak_rss_mb(dataset, model_dir, steps, batch))
    peaks = [float(np.median(values)) for values in samples]
    case = (
        f"peak memory, image folder {counts[0]} -> {counts[1]} JPEGs "
        f"{FOLDER_IMAGE_SIZE}x{FOLDER_IMAGE_SIZE}, {steps} steps of {batch}"
    )
    note = (
        f"median peak RSS {peaks[0]:.0f} MB -> {peaks[1]:.0f} MB over {len(samples[0])} "
        "runs each; the ms column holds the larger peak in MB, the ratio column the growth in MB"
    )
    return [
        common.Row(
            "trainer", case, "tfbn trainer, streamed folder", peaks[1], peaks[1] - peaks[0], note
        )
    ]


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
