"""BN tolerates higher learning rates: x1, x5 and x30 the base rate."""

from __future__ import annotations

import keras

from tfbn.experiments import common
from tfbn.experiments.convergence import sigmoid_mlp

BASE_LEARNING_RATE = 0.1
MULTIPLIERS = (1, 5, 30)


def run(config: common.ExperimentConfig) -> common.ExperimentResult:
    """Runs the experiment.

    Args:
        config: The shared experiment settings.

    Returns:
        The rows, summary and plots.
    """
    data = common.load_data(config)
    steps = config.steps(800)
    eval_every = max(1, steps // 20)
    rows, curves = [], {}
    for batch_norm in (False, True):
        for multiplier in MULTIPLIERS:
            label = f"{'BN' if batch_norm else 'no BN'}, lr x{multiplier}"
            model = sigmoid_mlp(
                data.train_x.shape[1], data.num_classes, batch_norm, seed=config.seed
            )
            history = common.train_classifier(
                model,
                data,
                steps=steps,
                batch_size=60,
                optimizer=keras.optimizers.SGD(BASE_LEARNING_RATE * multiplier),
                seed=config.seed,
                eval_every=eval_every,
                progress=config.progress,
                label=label,
            )
            for row in history:
                rows.append(
                    {
                        "batch_norm": batch_norm,
                        "lr_multiplier": multiplier,
                        "learning_rate": BASE_LEARNING_RATE * multiplier,
                        **row,
                    }
                )
            curves[label] = common.series(history, "step", "test_accuracy")
    finals = [row for row in rows if row["step"] == steps]
    table = "".join(
        f"| {'yes' if r['batch_norm'] else 'no'} | x{r['lr_multiplier']} ({r['learning_rate']:g}) "
        f"| {r['test_accuracy']:.3f} | {r['train_loss']:.3g} |\n"
        for r in finals
    )
    summary = (
        f"Sigmoid MLP, SGD with base learning rate {BASE_LEARNING_RATE}, batch 60, "
        f"{steps} steps.\n\n"
        "| BN | learning rate | final test accuracy | last train loss |\n|---|---|---|---|\n"
        + table
        + "\nWithout BN the largest rate saturates the sigmoids (or diverges); with BN the "
        "normalized pre-activations keep the gradients usable at every rate."
    )
    plot = common.Plot(
        "learning_rate.png",
        "Test accuracy vs steps at x1 / x5 / x30 learning rate",
        "step",
        "test accuracy",
        curves,
    )
    return common.ExperimentResult("learning_rate", rows, summary, [plot])
