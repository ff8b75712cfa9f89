"""The optimizer and learning-rate schedule of a training run."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from tfbn.finetune.config import TrainConfig


def make_learning_rate(config: TrainConfig):
    """The learning rate (a float or a Keras schedule) of `config`.

    `cosine` decays to 0 over `train_steps`; `step` multiplies the rate by
    0.1 at 60% and again at 85% of `train_steps`; `constant` keeps it.

    Args:
        config: The run configuration (`learning_rate`, `lr_schedule`,
            `train_steps`).

    Returns:
        A float or a `keras.optimizers.schedules.LearningRateSchedule`.
    """
    rate = config.learning_rate
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(rate, config.train_steps)
    if config.lr_schedule == "step":
        boundaries = [int(config.train_steps * 0.6), int(config.train_steps * 0.85)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            boundaries, [rate, rate * 0.1, rate * 0.01]
        )
    return rate


def make_optimizer(
    config: TrainConfig, update_variables: Sequence[keras.Variable]
) -> keras.optimizers.Optimizer:
    """The optimizer of `config`, built for `update_variables`.

    Weight decay applies to kernels only: BN scale/offset and biases (every
    variable of rank <= 1) are not weights to shrink.

    Args:
        config: The run configuration (`optimizer`, `weight_decay` and the
            learning-rate fields).
        update_variables: The variables the optimizer will update.

    Returns:
        The built optimizer.
    """
    rate = make_learning_rate(config)
    decay = config.weight_decay or None
    factories = {
        "sgd": lambda: keras.optimizers.SGD(rate, weight_decay=decay),
        "momentum": lambda: keras.optimizers.SGD(rate, momentum=0.9, weight_decay=decay),
        "adam": lambda: keras.optimizers.Adam(rate, weight_decay=decay),
        "adamw": lambda: keras.optimizers.AdamW(rate, weight_decay=config.weight_decay),
        "rmsprop": lambda: keras.optimizers.RMSprop(rate, weight_decay=decay),
    }
    optimizer = factories[config.optimizer]()
    optimizer.exclude_from_weight_decay(var_list=[v for v in update_variables if len(v.shape) <= 1])
    optimizer.build(list(update_variables))
    return optimizer
