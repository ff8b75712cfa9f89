"""Trains or partially fine-tunes a BN model: `python train.py --flagfile=configs/<name>.flags`.

Flags are defined in `tfbn/finetune/flags.py`; this entry point only parses them,
turns them into a `TrainConfig`, sets up the devices and the
`tf.distribute` strategy (which must come first), and hands both to the
trainer. A configuration error (a pattern that matches nothing, a
checkpoint that does not fit) ends the run with a usage message naming the
flag, not a traceback.
"""

import os
import sys

# tfbn's `_startup` holds back TensorFlow's C++ start-up lines (oneDNN and
# CPU-feature notes, "failed call to cuInit" on every machine without a GPU) for
# tfbn's own programs, unless TF_CPP_MIN_LOG_LEVEL is set. This opts train.py in;
# it must come before anything imports tfbn or TensorFlow.
os.environ.setdefault("TFBN_QUIET_STARTUP", "1")

from absl import app, flags, logging  # noqa: E402

from tfbn import _startup  # noqa: E402
from tfbn.finetune import distribution, skip_limit, trainer  # noqa: E402
from tfbn.finetune import flags as tfbn_flags  # noqa: E402

FLAGS = flags.FLAGS
tfbn_flags.define_flags(FLAGS)


def main(argv):
    """Runs one training run from the parsed flags.

    Args:
        argv: The command line left after flag parsing (the program name).

    Raises:
        app.UsageError: For positional arguments and configuration errors
            (the library's message, with flag names).
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        # TFDS logs every file it opens at INFO; the progress bar is the signal.
        logging.set_verbosity(logging.WARNING)
    try:
        config = tfbn_flags.config_from_flags(FLAGS)
        # Both must happen before TensorFlow initialises its devices: logical
        # CPUs cannot be split later, and collective ops are configured at start.
        with _startup.quiet_tensorflow_startup():
            distribution.configure_logical_cpus(config.num_cpu_devices)
            strategy = distribution.make_strategy(config.strategy)
        trainer.train(config, strategy)
    except skip_limit.NonFiniteTrainingError as error:
        # The run diverged; the checkpoints written so far are kept. Not a bug in
        # tfbn, so the message is the whole story: no traceback.
        sys.exit(f"train.py: {error}")
    except ValueError as error:
        message = tfbn_flags.as_flag_message(str(error))
        if message == str(error):
            raise  # Names no config field: not a configuration error, keep the traceback.
        raise app.UsageError(message) from None


if __name__ == "__main__":
    app.run(main)
