"""What every experiment shares: its config, data, training loop and outputs.

The training loop uses the trainer's own train step
(`tfbn.finetune.train_step.build_train_step`): deferred BN updates applied
after the gradients, and non-finite steps skipped.

An experiment is a function `run(config) -> ExperimentResult`. The result
holds the raw numbers (written as CSV), a markdown summary and plot specs;
`write_result` renders them, drawing PNGs only when matplotlib is installed
(`pip install tfbn[plots]`), so the numbers are never lost for lack of it.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfbn.data import pipeline
from tfbn.deferred_updates import deferred_updates
from tfbn.finetune import train_step
from tfbn.finetune.update_plan import plan_update

SOURCE = "tfbn_shapes/source"
TARGET = "tfbn_shapes/target"


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Settings shared by all experiments.

    Attributes:
        output_dir: Where the CSV, markdown and PNG files go.
        seed: Seed of weights, data order and everything random.
        scale: Multiplies every step count; 1.0 is the documented run, small
            values make smoke runs.
        image_size: Side of the (square) input images.
        data_dir: TFDS data directory (None: tfbn's default cache).
        progress: Show progress bars.
    """

    output_dir: str
    seed: int = 0
    scale: float = 1.0
    image_size: int = 16
    data_dir: str | None = None
    progress: bool = True

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("`output_dir` must be a directory path; received an empty value.")
        if not self.scale > 0:
            raise ValueError(f"`scale` must be > 0; received {self.scale}.")
        if self.image_size < 4:
            raise ValueError(f"`image_size` must be >= 4; received {self.image_size}.")

    def steps(self, full: int) -> int:
        """`full` steps scaled by `scale`, at least 2.

        Args:
            full: The step count of the documented run.

        Returns:
            The scaled step count.
        """
        return max(2, int(round(full * self.scale)))


@dataclasses.dataclass(frozen=True)
class Plot:
    """A figure: one series per label, each `(x values, y values)`.

    With `categories`, the x values index into them and the series are drawn
    as grouped bars labelled by category (for results that are not a curve).
    """

    filename: str
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[Sequence[float], Sequence[float]]]
    log_x: bool = False
    categories: Sequence[str] | None = None


@dataclasses.dataclass
class ExperimentResult:
    """What an experiment found.

    Attributes:
        name: The experiment's name.
        rows: The raw numbers, one dict per measurement (the CSV rows).
        summary: Markdown paragraphs with the findings.
        plots: The figures to draw.
    """

    name: str
    rows: list[dict]
    summary: str
    plots: list[Plot] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Data:
    """Flattened or image-shaped train/test arrays of one domain."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int


def load_data(config: ExperimentConfig, dataset: str = SOURCE, flatten: bool = True) -> Data:
    """Loads the embedded dataset (generated locally on first use).

    Args:
        config: The experiment settings (image size, data directory).
        dataset: The TFDS name.
        flatten: Flatten each image into a vector.

    Returns:
        The train and test arrays.
    """
    train = pipeline.load_split(dataset, "train", config.image_size, config.data_dir)
    test = pipeline.load_split(dataset, "test", config.image_size, config.data_dir)

    def prepare(images):
        return images.reshape(len(images), -1) if flatten else images

    return Data(
        prepare(train.images), train.labels, prepare(test.images), test.labels, train.num_classes
    )


def evaluate(
    model: keras.Model, x: np.ndarray, y: np.ndarray, training: bool = False, batch_size: int = 128
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy.

    `training=True` normalizes with each batch's statistics (what the model
    sees while it trains); the moving-statistics updates that causes are
    discarded, so evaluating never changes the model.

    Args:
        model: The classifier (logits out).
        x: Inputs.
        y: Integer labels.
        training: Normalize with batch statistics instead of moving ones.
        batch_size: Examples per forward pass.

    Returns:
        `(accuracy, mean cross-entropy)`.
    """
    correct, loss_sum = 0, 0.0
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")

    @tf.function
    def forward(inputs):
        with deferred_updates() as updates:
            logits = model(inputs, training=training)
            updates.discard()
        return logits

    for start in range(0, len(x), batch_size):
        logits = forward(x[start : start + batch_size])
        labels = y[start : start + batch_size]
        loss_sum += float(loss_fn(labels, logits))
        correct += int(np.sum(np.argmax(logits, axis=-1) == labels))
    return correct / len(x), loss_sum / len(x)


def train_classifier(
    model: keras.Model,
    data: Data,
    *,
    steps: int,
    batch_size: int,
    optimizer: keras.optimizers.Optimizer,
    seed: int,
    eval_every: int = 0,
    progress: bool = True,
    on_eval: Callable[[int], dict[str, float]] | None = None,
    label: str = "",
) -> list[dict]:
    """Trains every variable with cross-entropy, evaluating in inference mode along the way.

    Each step is the trainer's step (`train_step.build_train_step`) with an
    update plan covering the whole model: every BN layer updates its moving
    statistics; a step with a non-finite loss or gradient changes nothing.

    Args:
        model: The classifier (logits out).
        data: The train and test arrays.
        steps: Optimizer steps.
        batch_size: Examples per step.
        optimizer: A Keras optimizer.
        seed: Seeds the order of the examples.
        eval_every: Evaluate every this many steps (and after the last);
            0 evaluates only after the last step.
        progress: Show a progress bar.
        on_eval: Called with the step at each evaluation; its dict is merged
            into that evaluation's row.
        label: Shown next to the progress bar.

    Returns:
        One row per evaluation: step, test accuracy and loss, last train
        loss, and the steps skipped so far as non-finite.
    """
    step_fn = train_step.build_train_step(model, optimizer, plan_update(model))

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.train_x))
    position = 0
    bar = keras.utils.Progbar(
        steps, stateful_metrics=["loss", "test_acc"], verbose=1 if progress else 0
    )
    if progress and label:
        print(label)
    rows, loss = [], float("nan")
    for step in range(1, steps + 1):
        if position + batch_size > len(order):
            order, position = rng.permutation(len(data.train_x)), 0
        batch = order[position : position + batch_size]
        position += batch_size
        loss = float(step_fn(data.train_x[batch], data.train_y[batch])["loss"])
        values = [("loss", loss)]
        if (eval_every and step % eval_every == 0) or step == steps:
            accuracy, test_loss = evaluate(model, data.test_x, data.test_y)
            row = {
                "step": step,
                "test_accuracy": accuracy,
                "test_loss": test_loss,
                "train_loss": loss,
                "skipped_steps": int(step_fn.skipped_steps.numpy()),
            }
            if on_eval is not None:
                row.update(on_eval(step))
            rows.append(row)
            values.append(("test_acc", accuracy))
        bar.update(step, values)
    return rows


def write_result(result: ExperimentResult, output_dir: str) -> list[str]:
    """Writes `<name>.csv`, `<name>.md` and the PNG plots.

    Args:
        result: The experiment's result.
        output_dir: Where to write (created if needed).

    Returns:
        The paths written.
    """
    os.makedirs(output_dir, exist_ok=True)
    written = []
    csv_path = os.path.join(output_dir, f"{result.name}.csv")
    fields = list(dict.fromkeys(key for row in result.rows for key in row))
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(result.rows)
    written.append(csv_path)

    drawn = _draw_plots(result.plots, output_dir)
    written.extend(drawn)
    md_path = os.path.join(output_dir, f"{result.name}.md")
    with open(md_path, "w") as handle:
        handle.write(f"# Experiment: {result.name}\n\n{result.summary.strip()}\n\n")
        for path in drawn:
            handle.write(f"![{os.path.basename(path)}]({os.path.basename(path)})\n\n")
        if not drawn and result.plots:
            handle.write("(Plots skipped: install matplotlib, e.g. `pip install tfbn[plots]`.)\n\n")
        handle.write(f"Raw numbers: [{os.path.basename(csv_path)}]({os.path.basename(csv_path)})\n")
    written.append(md_path)
    return written


def _draw_plots(plots: Sequence[Plot], output_dir: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return []
    paths = []
    for plot in plots:
        figure, axes = pyplot.subplots(figsize=(6.4, 4.2))
        width = 0.8 / max(1, len(plot.series))
        for index, (label, (xs, ys)) in enumerate(plot.series.items()):
            ys = [y if y is not None and math.isfinite(y) else float("nan") for y in ys]
            if plot.categories is not None:
                axes.bar(
                    [x + (index - (len(plot.series) - 1) / 2) * width for x in xs],
                    ys,
                    width=width,
                    label=label,
                )
            else:
                axes.plot(list(xs), ys, marker="o" if len(xs) <= 12 else None, label=label)
        if plot.categories is not None:
            axes.set_xticks(range(len(plot.categories)))
            axes.set_xticklabels(plot.categories, rotation=15, ha="right", fontsize="small")
        if plot.log_x:
            axes.set_xscale("log", base=2)
        axes.set_title(plot.title)
        axes.set_xlabel(plot.xlabel)
        axes.set_ylabel(plot.ylabel)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        figure.tight_layout()
        path = os.path.join(output_dir, plot.filename)
        figure.savefig(path, dpi=110)
        pyplot.close(figure)
        paths.append(path)
    return paths


def series(rows: Sequence[dict], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    """Pulls one plot series out of result rows.

    Args:
        rows: The result rows.
        x_key: The column of the x values.
        y_key: The column of the y values.

    Returns:
        `(x values, y values)`.
    """
    return [row[x_key] for row in rows], [row[y_key] for row in rows]
