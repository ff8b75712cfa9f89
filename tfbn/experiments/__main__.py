"""Command line: `python -m tfbn.experiments <name> [--output_dir=DIR] [--scale=0.1]`.

Names: convergence, learning_rate, small_batch, finetune_shift, statistics,
or `all`. The flags are turned into an `ExperimentConfig` here and nowhere else.
"""

from absl import app, flags, logging

from tfbn import experiments

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "output_dir", "experiments_output", "Directory for the CSV, markdown and PNG files."
)
flags.DEFINE_integer("seed", 0, "Seed of weights, data order and everything random.")
flags.DEFINE_float(
    "scale", 1.0, "Multiplies every step count (0.05 makes a smoke run).", lower_bound=1e-4
)
flags.DEFINE_integer("image_size", 16, "Side of the square input images.", lower_bound=4)
flags.DEFINE_string("data_dir", None, "TFDS data directory (default: tfbn's cache).")
flags.DEFINE_bool("progress", True, "Show progress bars.")


def main(argv):
    """Runs the named experiment (or all of them) from the parsed flags.

    Args:
        argv: The program name and the experiment name.

    Raises:
        app.UsageError: Unless exactly one known name (or `all`) is given.
    """
    logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset it opens
    names = argv[1:]
    if len(names) != 1 or names[0] not in list(experiments.EXPERIMENTS) + ["all"]:
        raise app.UsageError(
            f"Name one experiment: {sorted(experiments.EXPERIMENTS)} or 'all'; received {names}."
        )
    config = experiments.ExperimentConfig(
        output_dir=FLAGS.output_dir,
        seed=FLAGS.seed,
        scale=FLAGS.scale,
        image_size=FLAGS.image_size,
        data_dir=FLAGS.data_dir,
        progress=FLAGS.progress,
    )
    chosen = list(experiments.EXPERIMENTS) if names[0] == "all" else names
    for name in chosen:
        for path in experiments.run_experiment(name, config):
            print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
