"""Fine-tunes a saved `keras.applications` model with the tfbn trainer, no builder needed.

Run: python examples/finetune_keras_application.py [--workdir=DIR] [--steps=N]

1. Saves `keras.applications.MobileNetV2(alpha=0.35, input_shape=(32, 32, 3),
   classes=4, weights=None, classifier_activation=None)` as a `.keras` file
   (no download: random initial weights; logits out, as the trainer's loss
   expects). In real use this is your pretrained model.
2. Fine-tunes only its last convolution and its classifier on the embedded
   target domain (`tfbn_shapes/target`): architecture and weights come from
   the file, the images are resized to its 32x32 input, and the other 51
   stock Keras BN layers stay in inference mode.
3. Checks from outside the trainer: it loads the fine-tuned model back from
   disk and compares every weight outside the update set with the file it
   started from, bit for bit (`np.array_equal`).

The same run on the command line:

    python train.py --model=mobilenet_v2.keras --dataset=tfbn_shapes/target \\
        --model_dir=runs/mnv2 --update_part=Conv_1 --update_part=predictions

(`Conv_1` also matches `Conv_1_bn`, the BN layer after it, which then
trains and updates its statistics; `--dry_run` lists every path.)
"""

from __future__ import annotations

import argparse
import os
import tempfile

import keras
import numpy as np

from tfbn.finetune import trainer
from tfbn.finetune.config import TrainConfig
from tfbn.layers import introspection

UPDATE_PART = ("Conv_1", "predictions")


def save_mobilenet(path: str) -> str:
    """Saves a small, randomly initialised MobileNetV2 that outputs 4 logits.

    Args:
        path: The `.keras` file to write.

    Returns:
        `path`.
    """
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        alpha=0.35,
        input_shape=(32, 32, 3),
        classes=4,
        weights=None,
        classifier_activation=None,
    )
    model.save(path)
    return path


def weights(path: str) -> dict[str, np.ndarray]:
    """The weights of a saved model by nested path, read back from the file.

    Args:
        path: A `.keras` file.

    Returns:
        `{path: value}`.
    """
    model = keras.saving.load_model(path)
    return {p: v.numpy() for p, v in introspection.nested_variable_paths(model).items()}


def main(workdir: str | None = None, steps: int = 20, data_dir: str | None = None) -> dict:
    """Saves the model, fine-tunes part of it, and checks the frozen rest.

    Args:
        workdir: Where the model file and the run go; a temporary directory
            when None.
        steps: Fine-tune steps.
        data_dir: TFDS data directory (default: tfbn's cache).

    Returns:
        `{"trained": n, "frozen": n, "frozen_identical": bool, "bn_modes":
        {layer path: mode}}`.
    """
    workdir = workdir or tempfile.mkdtemp(prefix="tfbn_mnv2_")
    os.makedirs(workdir, exist_ok=True)
    model_file = save_mobilenet(os.path.join(workdir, "mobilenet_v2.keras"))
    config = TrainConfig(
        model_dir=os.path.join(workdir, "run"),
        model=model_file,
        dataset="tfbn_shapes/target",
        data_dir=data_dir,
        batch_size=32,
        train_steps=steps,
        learning_rate=0.02,
        update_part=UPDATE_PART,
        frozen_bn_mode="inference",
        checkpoint_interval=steps,
        summary_interval=steps,
        eval_batches=2,
        verbose=0,
        # The trainer's export also writes a SavedModel, which takes longer
        # to trace than this whole run; the `.keras` file is enough here.
        export=False,
    )
    result = trainer.train(config)
    fine_tuned = os.path.join(workdir, "fine_tuned.keras")
    result.model.save(fine_tuned)

    before, after = weights(model_file), weights(fine_tuned)
    trained = [p for p in before if p.startswith(UPDATE_PART)]
    frozen = [p for p in before if not p.startswith(UPDATE_PART)]
    identical = all(np.array_equal(after[p], before[p]) for p in frozen)
    modes = {result.plan.path(layer): str(mode) for layer, mode in result.plan.bn_modes}
    print(f"Fine-tuned {model_file} for {steps} steps on tfbn_shapes/target.")
    print(f"Trained {len(trained)} variables: {', '.join(trained)}")
    print(
        f"{len(frozen)} frozen variables (kernels, gamma, beta, moving statistics) "
        f"bit-identical to the file: {'yes' if identical else 'NO'}"
    )
    print(
        f"BN layers: {sum(m == 'train' for m in modes.values())} trained, "
        f"{sum(m == 'inference' for m in modes.values())} frozen in inference mode"
    )
    return {
        "trained": len(trained),
        "frozen": len(frozen),
        "frozen_identical": identical,
        "bn_modes": modes,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--steps", type=int, default=20)
    arguments = parser.parse_args()
    main(arguments.workdir, arguments.steps)
