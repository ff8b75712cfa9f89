"""Small batches: BN vs batch renormalization vs ghost BN, batch sizes 2..128.

Every variant trains for the same number of steps with the same momentum,
so the moving averages are equally warm; only the batch size changes. The
gap between training-mode statistics (noisy for tiny batches) and the
inference-mode moving statistics is what renorm was designed to close.
"""

from __future__ import annotations

import keras

from tfbn.experiments import common
from tfbn.models.bn_mlp import bn_mlp

BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128)
# The paper's clipping; renorm_momentum 0.9 rather than 0.99 because these
# runs are short: with 0.99 the renorm statistics lag the drifting features
# for ~100 of the 400 steps and renorm then trains worse than plain BN.
RENORM = {
    "renorm": True,
    "renorm_clipping": {"rmax": 3.0, "rmin": 1.0 / 3.0, "dmax": 5.0},
    "renorm_momentum": 0.9,
}


def variant_kwargs(variant: str, batch_size: int) -> dict:
    """BN arguments of one variant; ghost batches are a quarter of the batch (>= 2).

    Args:
        variant: `"BN"`, `"batch renorm"` or `"ghost BN"`.
        batch_size: The training batch size.

    Returns:
        Keyword arguments of `tfbn.BatchNormalization`.

    Raises:
        ValueError: For an unknown variant.
    """
    if variant == "BN":
        return {}
    if variant == "batch renorm":
        return dict(RENORM)
    if variant == "ghost BN":
        ghost = max(2, batch_size // 4)
        return {"virtual_batch_size": ghost} if ghost < batch_size else {}
    raise ValueError(f"Unknown variant {variant!r}; use 'BN', 'batch renorm' or 'ghost BN'.")


def relu_mlp(input_dim: int, num_classes: int, bn_kwargs: dict, seed: int) -> keras.Model:
    """The library's `bn_mlp` with two Dense-BN-ReLU layers (128, 64) and no hidden head.

    Args:
        input_dim: Features per (flattened) example.
        num_classes: Number of output logits.
        bn_kwargs: BN arguments of the variant; momentum is 0.9 unless given.
        seed: Seeds the initial weights.

    Returns:
        The model.
    """
    keras.utils.set_random_seed(seed)
    return bn_mlp(
        num_classes,
        (input_dim,),
        widths=(128, 64),
        head_width=None,
        bn_kwargs={"momentum": 0.9, **bn_kwargs},
    )


def run(config: common.ExperimentConfig) -> common.ExperimentResult:
    """Runs the experiment.

    Args:
        config: The shared experiment settings.

    Returns:
        The rows, summary and plots.
    """
    data = common.load_data(config)
    steps = config.steps(400)
    rows, curves = [], {}
    for variant in ("BN", "batch renorm", "ghost BN"):
        accuracies = []
        for batch_size in BATCH_SIZES:
            model = relu_mlp(
                data.train_x.shape[1],
                data.num_classes,
                variant_kwargs(variant, batch_size),
                config.seed,
            )
            history = common.train_classifier(
                model,
                data,
                steps=steps,
                batch_size=batch_size,
                optimizer=keras.optimizers.Adam(1e-3),
                seed=config.seed,
                progress=config.progress,
                label=f"{variant}, batch {batch_size}",
            )
            train_mode_accuracy, _ = common.evaluate(
                model, data.test_x, data.test_y, training=True, batch_size=batch_size
            )
            rows.append(
                {
                    "variant": variant,
                    "batch_size": batch_size,
                    "steps": steps,
                    "inference_accuracy": history[-1]["test_accuracy"],
                    "training_mode_accuracy": train_mode_accuracy,
                }
            )
            accuracies.append(history[-1]["test_accuracy"])
        curves[variant] = (list(BATCH_SIZES), accuracies)
    table = "".join(
        f"| {r['variant']} | {r['batch_size']} | {r['inference_accuracy']:.3f} | "
        f"{r['training_mode_accuracy']:.3f} |\n"
        for r in rows
    )
    summary = (
        f"ReLU MLP with two BN layers (momentum 0.9), Adam(1e-3), {steps} steps per run. "
        "Ghost BN uses ghost batches of a quarter of the batch (none below 8); renorm clips "
        "r to [1/3, 3] and d to [-5, 5] with renorm_momentum 0.9 "
        "(0.99 lags on a run this short).\n\n"
        "| variant | batch size | test accuracy (inference) | test accuracy (batch statistics) |\n"
        "|---|---|---|---|\n" + table
    )
    plot = common.Plot(
        "small_batch.png",
        "Inference-mode test accuracy vs batch size",
        "batch size",
        "test accuracy",
        curves,
        log_x=True,
    )
    return common.ExperimentResult("small_batch", rows, summary, [plot])
