"""Fine-tuning the head under covariate shift: what to do with the frozen BN layers.

Pretrain Tiny-Darknet on `tfbn_shapes/source`, then fine-tune only `head/` on
the shifted `tfbn_shapes/target` with each `frozen_bn_mode` of the trainer,
and once more after `tfbn.recompute_statistics` has re-estimated every BN
layer's population statistics on target data (AdaBN done exactly, before
the head is trained). We report target accuracy and how far the backbone's
moving statistics drifted from the pretrained ones.
"""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf

from tfbn.experiments import common
from tfbn.finetune import checkpoint as checkpoint_lib
from tfbn.finetune import trainer, update_plan
from tfbn.finetune.config import TrainConfig
from tfbn.tools.population_statistics import recompute_statistics

MODES = ("inference", "batch", "adapt")
RECOMPUTED = "recompute, then inference"


def _backbone_statistics(model: keras.Model) -> dict:
    """`{layer path: (moving_mean, moving_variance)}` of the backbone's BN layers."""
    return {
        layer.path: (layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy())
        for layer in update_plan.batch_norm_layers(model)
        if layer.path.startswith("backbone/")
    }


def _drift(model: keras.Model, reference: dict) -> float:
    """Largest absolute change of a backbone moving statistic from `reference`."""
    now = _backbone_statistics(model)
    return float(
        max(
            np.max(np.abs(value - original))
            for path, pair in reference.items()
            for value, original in zip(now[path], pair)
        )
    )


def _save_as_init_checkpoint(model: keras.Model, directory: str) -> str:
    """Writes `model` in the trainer's checkpoint format; returns the prefix."""
    optimizer = keras.optimizers.SGD()
    optimizer.build([])
    step = tf.Variable(0, dtype=tf.int64)
    checkpoint = checkpoint_lib.make_checkpoint(
        model, optimizer, step, tf.Variable(0, dtype=tf.int64)
    )
    return checkpoint.write(os.path.join(directory, "recomputed"))


def run(config: common.ExperimentConfig) -> common.ExperimentResult:
    """Runs the experiment.

    Args:
        config: The shared experiment settings.

    Returns:
        The rows, summary and plots.
    """
    work_dir = os.path.join(config.output_dir, "finetune_shift_runs")
    verbose = 1 if config.progress else 0
    base = TrainConfig(
        model_dir=os.path.join(work_dir, "pretrain"),
        model="tiny_darknet",
        dataset=common.SOURCE,
        data_dir=config.data_dir,
        image_size=config.image_size,
        batch_size=32,
        train_steps=config.steps(300),
        learning_rate=0.05,
        bn_momentum=0.9,
        checkpoint_interval=10**6,
        seed=config.seed,
        verbose=verbose,
        export=False,
    )
    pretrained = trainer.train(base)
    target = common.load_data(config, common.TARGET, flatten=False)
    source = common.load_data(config, common.SOURCE, flatten=False)
    before, _ = common.evaluate(pretrained.model, target.test_x, target.test_y)
    rows = [
        {
            "variant": "pretrained, no fine-tune",
            "target_accuracy": before,
            "source_accuracy": common.evaluate(pretrained.model, source.test_x, source.test_y)[0],
            "backbone_stat_drift": 0.0,
        }
    ]

    source_statistics = _backbone_statistics(pretrained.model)
    batches = [target.train_x[i : i + 128] for i in range(0, len(target.train_x), 128)]
    recompute_statistics(pretrained.model, batches, progress=False)
    recomputed_prefix = _save_as_init_checkpoint(pretrained.model, work_dir)

    finetune_steps = config.steps(150)
    variants = [(mode, mode, base.model_dir) for mode in MODES]
    variants.append((RECOMPUTED, "inference", recomputed_prefix))
    for label, mode, init in variants:
        run_config = dataclasses.replace(
            base,
            dataset=common.TARGET,
            train_steps=finetune_steps,
            learning_rate=0.02,
            init_checkpoint=init,
            restore_part=("backbone/",),
            update_part=("head/",),
            frozen_bn_mode=mode,
            model_dir=os.path.join(work_dir, label.replace(", ", "_").replace(" ", "_")),
        )
        result = trainer.train(run_config)
        rows.append(
            {
                "variant": label,
                "target_accuracy": common.evaluate(result.model, target.test_x, target.test_y)[0],
                "source_accuracy": common.evaluate(result.model, source.test_x, source.test_y)[0],
                "backbone_stat_drift": _drift(result.model, source_statistics),
            }
        )
    table = "".join(
        f"| {r['variant']} | {r['target_accuracy']:.3f} | {r['source_accuracy']:.3f} "
        f"| {r['backbone_stat_drift']:.3g} |\n"
        for r in rows
    )
    summary = (
        f"Tiny-Darknet pretrained for {base.train_steps} steps on the source domain, then "
        f"`head/` fine-tuned for {finetune_steps} steps on the covariate-shifted target "
        "domain with each frozen-BN mode.\n\n"
        "| variant | target test accuracy | source test accuracy | backbone moving-stat drift |\n"
        "|---|---|---|---|\n"
        + table
        + "\n`inference` keeps the backbone's statistics bit-identical (drift 0) but normalizes "
        "target features with source statistics; `batch` normalizes with target batch statistics "
        "in training only, so training and inference disagree; `adapt` (the seed's global "
        "UPDATE_OPS, AdaBN) moves the backbone statistics towards the target; recomputing the "
        "population statistics on target data first gives the head target-normalized features "
        "in both training and inference."
    )
    positions = list(range(len(rows)))
    plot = common.Plot(
        "finetune_shift.png",
        "Head fine-tune under covariate shift",
        "frozen-BN treatment",
        "test accuracy",
        {
            "target domain": (positions, [r["target_accuracy"] for r in rows]),
            "source domain": (positions, [r["source_accuracy"] for r in rows]),
        },
        categories=[r["variant"] for r in rows],
    )
    return common.ExperimentResult("finetune_shift", rows, summary, [plot])
