"""Moving statistics on a short run: momentum 0.9 / 0.99 / 0.999 / cumulative.

After a few hundred steps, a high momentum leaves the moving statistics far
from the data (the EMA needs about 1 / (1 - momentum) steps to warm up), so
inference-mode accuracy lags training-mode accuracy. `recompute_statistics`
(the paper's population statistics) closes the gap whatever the momentum.
"""

from __future__ import annotations

import keras

from tfbn.experiments import common
from tfbn.experiments.small_batch import relu_mlp
from tfbn.tools.population_statistics import recompute_statistics

MOMENTA = (0.9, 0.99, 0.999, None)


def run(config: common.ExperimentConfig) -> common.ExperimentResult:
    """Runs the experiment.

    Args:
        config: The shared experiment settings.

    Returns:
        The rows, summary and plots.
    """
    data = common.load_data(config)
    steps = config.steps(300)
    batch_size = 32
    rows = []
    for momentum in MOMENTA:
        label = "cumulative (None)" if momentum is None else f"{momentum:g}"
        model = relu_mlp(
            data.train_x.shape[1], data.num_classes, {"momentum": momentum}, config.seed
        )
        common.train_classifier(
            model,
            data,
            steps=steps,
            batch_size=batch_size,
            optimizer=keras.optimizers.Adam(1e-3),
            seed=config.seed,
            progress=config.progress,
            label=f"momentum {label}",
        )
        training_mode, _ = common.evaluate(
            model, data.test_x, data.test_y, training=True, batch_size=batch_size
        )
        inference_mode, _ = common.evaluate(model, data.test_x, data.test_y)
        batches = [data.train_x[i : i + 256] for i in range(0, len(data.train_x), 256)]
        recompute_statistics(model, batches, progress=False)
        recomputed, _ = common.evaluate(model, data.test_x, data.test_y)
        rows.append(
            {
                "momentum": label,
                "steps": steps,
                "training_mode_accuracy": training_mode,
                "inference_accuracy": inference_mode,
                "recomputed_inference_accuracy": recomputed,
            }
        )
    table = "".join(
        f"| {r['momentum']} | {r['training_mode_accuracy']:.3f} | {r['inference_accuracy']:.3f} "
        f"| {r['recomputed_inference_accuracy']:.3f} |\n"
        for r in rows
    )
    summary = (
        f"ReLU MLP with two BN layers, Adam(1e-3), batch {batch_size}, only {steps} steps.\n\n"
        "| momentum | test accuracy, batch statistics | inference mode | inference after "
        "`recompute_statistics` |\n|---|---|---|---|\n"
        + table
        + "\nWith momentum 0.999 the moving statistics have barely left their initial (0, 1) "
        "after a short run; recomputing the population statistics on the training data "
        "restores inference accuracy for every momentum."
    )
    positions = list(range(len(rows)))
    plot = common.Plot(
        "statistics.png",
        f"Test accuracy after {steps} steps, by BN momentum",
        "momentum",
        "test accuracy",
        {
            key.replace("_", " "): (positions, [r[key] for r in rows])
            for key in (
                "training_mode_accuracy",
                "inference_accuracy",
                "recomputed_inference_accuracy",
            )
        },
        categories=[r["momentum"] for r in rows],
    )
    return common.ExperimentResult("statistics", rows, summary, [plot])
