"""The paper's MNIST experiment in spirit: BN makes a sigmoid MLP train faster.

Ioffe & Szegedy (2015), figure 1: an MLP with three hidden layers of 100
sigmoid units, with and without BN before each sigmoid. We plot test
accuracy against steps, and the 15th/50th/85th percentiles of one unit's
sigmoid input in the last hidden layer, which drift without BN and stay put
with it.
"""

from __future__ import annotations

import keras
import numpy as np

from tfbn.deferred_updates import deferred_updates
from tfbn.experiments import common
from tfbn.layers.batch_normalization import BatchNormalization

HIDDEN_UNITS = (100, 100, 100)
PERCENTILES = (15, 50, 85)
WATCHED_UNIT = 0


def sigmoid_mlp(
    input_dim: int, num_classes: int, batch_norm: bool, bn_kwargs: dict | None = None, seed: int = 0
) -> keras.Model:
    """The paper's MLP; the last hidden layer's sigmoid input is `pre_sigmoid3`.

    No bundled builder fits (sigmoid units, an identity stand-in for BN), so
    the experiment builds it here.

    Args:
        input_dim: Features per (flattened) example.
        num_classes: Number of output logits.
        batch_norm: Put a `tfbn.BatchNormalization` before each sigmoid.
        bn_kwargs: Extra BN arguments.
        seed: Seeds the initial weights.

    Returns:
        The model.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_dim,))
    x = inputs
    for index, units in enumerate(HIDDEN_UNITS, start=1):
        x = keras.layers.Dense(units, use_bias=not batch_norm, name=f"dense{index}")(x)
        if batch_norm:
            x = BatchNormalization(name=f"pre_sigmoid{index}", **(bn_kwargs or {}))(x)
        else:
            x = keras.layers.Identity(name=f"pre_sigmoid{index}")(x)
        x = keras.layers.Activation("sigmoid", name=f"sigmoid{index}")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="bn_mlp" if batch_norm else "mlp")


def run(config: common.ExperimentConfig) -> common.ExperimentResult:
    """Runs the experiment.

    Args:
        config: The shared experiment settings.

    Returns:
        The rows, summary and plots.
    """
    data = common.load_data(config)
    steps = config.steps(1500)
    eval_every = max(1, steps // 30)
    rows, curves, bands = [], {}, {}
    for batch_norm in (False, True):
        label = "with BN" if batch_norm else "without BN"
        model = sigmoid_mlp(data.train_x.shape[1], data.num_classes, batch_norm, seed=config.seed)
        probe = keras.Model(model.input, model.get_layer(f"pre_sigmoid{len(HIDDEN_UNITS)}").output)

        def percentiles(step, probe=probe):
            # The distribution the sigmoid sees during training: batch
            # statistics over the test set, with the BN updates discarded.
            with deferred_updates() as updates:
                values = probe(data.test_x, training=True).numpy()[:, WATCHED_UNIT]
                updates.discard()
            return {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}

        history = common.train_classifier(
            model,
            data,
            steps=steps,
            batch_size=60,
            optimizer=keras.optimizers.SGD(0.5),
            seed=config.seed,
            eval_every=eval_every,
            progress=config.progress,
            on_eval=percentiles,
            label=label,
        )
        for row in history:
            rows.append({"model": label, **row})
        curves[label] = common.series(history, "step", "test_accuracy")
        for p in PERCENTILES:
            bands[f"{label}, p{p}"] = common.series(history, "step", f"p{p}")

    final = {row["model"]: row for row in rows}
    half = {label: _accuracy_at(rows, label, steps // 2) for label in final}
    summary = (
        f"Sigmoid MLP {list(HIDDEN_UNITS)}, SGD(0.5), batch 60, {steps} steps on the embedded "
        f"`tfbn_shapes/source` images ({config.image_size}x{config.image_size}, flattened).\n\n"
        "| model | test accuracy at half the steps | final test accuracy |\n|---|---|---|\n"
        + "".join(
            f"| {label} | {half[label]:.3f} | {final[label]['test_accuracy']:.3f} |\n"
            for label in final
        )
        + "\nThe second plot follows the 15th, 50th and 85th percentiles of one unit's sigmoid "
        "input in the last hidden layer (test set, as seen in training mode): with BN the "
        "distribution stays stable, without BN it drifts, as in the paper's figure 1(b, c)."
    )
    plots = [
        common.Plot(
            "convergence_accuracy.png", "Test accuracy vs steps", "step", "test accuracy", curves
        ),
        common.Plot(
            "convergence_percentiles.png",
            "Sigmoid input percentiles (last hidden layer)",
            "step",
            "sigmoid input",
            bands,
        ),
    ]
    return common.ExperimentResult("convergence", rows, summary, plots)


def _accuracy_at(rows, label, step):
    candidates = [row for row in rows if row["model"] == label and row["step"] <= max(step, 1)]
    return candidates[-1]["test_accuracy"] if candidates else float("nan")
