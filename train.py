"""Trains or partially fine-tunes a BN model: `python train.py --flagfile=configs/<name>.flags`.

Flags are defined in `tfbn/flags.py`; this entry point only parses them,
turns them into a `TrainConfig` and hands it to the trainer.
"""

from absl import app, flags, logging

from tfbn import flags as tfbn_flags
from tfbn.finetune import trainer

FLAGS = flags.FLAGS
tfbn_flags.define_flags(FLAGS)


def main(argv):
    """Runs one training run from the parsed flags."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        # TFDS logs every file it opens at INFO; the progress bar is the signal.
        logging.set_verbosity(logging.WARNING)
    trainer.train(tfbn_flags.config_from_flags(FLAGS))


if __name__ == "__main__":
    app.run(main)
