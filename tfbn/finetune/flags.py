"""The absl flags of `train.py`: definitions, the config they fill, error wording.

Only `train.py` and this module touch absl flags; library code receives a
`tfbn.finetune.config.TrainConfig`. Every flag gets the validator of its config field,
so a bad value is rejected at parse time with a message naming the flag.
Library errors name config fields (`update_part`); `as_flag_message` is the
one place that words them as flags (--update_part) for the command line.
"""

from __future__ import annotations

import dataclasses
import re

from absl import flags

from tfbn.finetune import config as config_lib


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the trainer's flags (and their validators) on `flag_values`.

    Args:
        flag_values: The registry to define them on; tests pass a fresh
            `flags.FlagValues()` so they do not share state.
    """
    fv = flag_values
    d = config_lib.TrainConfig.__dataclass_fields__

    def default(name):
        return d[name].default

    flags.DEFINE_string(
        "model_dir",
        None,
        "Directory for checkpoints, TensorBoard "
        "summaries, metrics.jsonl, flags.txt and bn_report.json. "
        "A checkpoint found here is resumed.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "model",
        default("model"),
        "Registered model name (tiny_darknet, "
        "bn_mlp, inception_bn), 'package.module:function' building a "
        "Keras model from (num_classes, input_shape), or a saved <file>.keras "
        "(architecture and weights from the file; images resized to its input size; "
        "its output must have one logit per class).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "dataset",
        default("dataset"),
        "A TFDS name such as "
        "'tfbn_shapes/source' or 'cifar10', or 'folder:<root>' for "
        "images in <root>/<split>/<class>/*.jpg.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "data_dir",
        default("data_dir"),
        "TFDS data directory; default ~/.cache/tfbn/tensorflow_datasets.",
        flag_values=fv,
    )
    flags.DEFINE_string("train_split", default("train_split"), "Split to train on.", flag_values=fv)
    flags.DEFINE_string(
        "eval_split",
        default("eval_split"),
        "Split to evaluate on; default: the first of validation, val, test that exists.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "image_size",
        default("image_size"),
        "Images are resized to image_size x image_size.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "batch_size", default("batch_size"), "Training batch size (>= 2).", flag_values=fv
    )
    flags.DEFINE_integer(
        "train_steps",
        default("train_steps"),
        "Total training steps (a resumed run continues up to this number).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "optimizer",
        default("optimizer"),
        list(config_lib.OPTIMIZERS),
        "Optimizer ('momentum' is SGD with momentum 0.9).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "learning_rate",
        default("learning_rate"),
        f"Peak learning rate: finite, in (0, {config_lib.MAX_LEARNING_RATE:g}].",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "lr_schedule",
        default("lr_schedule"),
        list(config_lib.LR_SCHEDULES),
        "constant; cosine decay to 0 over train_steps; or step (x0.1 at 60% and 85%).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "weight_decay",
        default("weight_decay"),
        "Decoupled weight decay on kernels of the update set (BN and biases excluded).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "init_checkpoint",
        default("init_checkpoint"),
        "Weights to restore from when "
        "model_dir holds none: a tfbn checkpoint (a model_dir or a checkpoint "
        "prefix), a .keras or .weights.h5 file, or a TF1 Saver checkpoint prefix; "
        "matched by nested variable path (see --dry_run).",
        flag_values=fv,
    )
    flags.DEFINE_multi_string(
        "restore_part",
        [],
        "Regex (re.match on variable paths) of "
        "variables restored from --init_checkpoint; repeatable; "
        "default: all.",
        flag_values=fv,
    )
    flags.DEFINE_multi_string(
        "restore_exclude", [], "Regex of variables not restored; repeatable.", flag_values=fv
    )
    flags.DEFINE_multi_string(
        "update_part",
        [],
        "Regex of variables trained (and BN "
        "layers whose statistics update); repeatable; default: all.",
        flag_values=fv,
    )
    flags.DEFINE_multi_string(
        "freeze_part",
        [],
        "Regex of variables kept frozen even if --update_part selects them; repeatable.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "frozen_bn_mode",
        default("frozen_bn_mode"),
        list(config_lib.FROZEN_BN_MODES),
        "BN layers outside the update set: "
        "inference (moving statistics, no updates), batch (batch statistics, "
        "no updates) or adapt (batch statistics and updates, AdaBN).",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "freeze_batchnorm",
        default("freeze_batchnorm"),
        "Take every BN layer (gamma, beta, statistics) out of the update set.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "bn_momentum",
        default("bn_momentum"),
        "Override every BN layer's momentum (Keras convention, in [0, 1)).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "bn_epsilon",
        default("bn_epsilon"),
        "Override every BN layer's epsilon (finite, > 0).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "checkpoint_interval",
        default("checkpoint_interval"),
        "Save a checkpoint every this many steps (and at the end).",
        flag_values=fv,
    )
    flags.DEFINE_integer("max_to_keep", default("max_to_keep"), "Checkpoints kept.", flag_values=fv)
    flags.DEFINE_integer(
        "eval_interval",
        default("eval_interval"),
        "Evaluate every this many steps; 0: only at the end.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "eval_batches",
        default("eval_batches"),
        "Batches per evaluation; 0: the whole split.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "summary_interval",
        default("summary_interval"),
        "Write TensorBoard summaries and metrics.jsonl every this many steps.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "max_consecutive_skipped_steps",
        default("max_consecutive_skipped_steps"),
        "Stop the run with an error after this many steps in a row were skipped "
        "because the loss or a gradient was not finite (the model has diverged and "
        "would otherwise finish unchanged with exit code 0); 0 never stops.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "seed", default("seed"), "Seed of initialization and data order.", flag_values=fv
    )
    flags.DEFINE_integer(
        "verbose",
        default("verbose"),
        "0 quiet, 1 progress bar, 2 one line per summary.",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "dry_run",
        default("dry_run"),
        "Print the restore, update, freeze and BN sets, then exit without training.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "export_dir",
        default("export_dir"),
        "Where the final model is "
        "exported as model.keras and saved_model/; default "
        "<model_dir>/export.",
        flag_values=fv,
    )
    flags.DEFINE_boolean("export", default("export"), "Export the final model.", flag_values=fv)
    flags.DEFINE_enum(
        "strategy",
        default("strategy"),
        list(config_lib.STRATEGIES),
        "tf.distribute strategy: default (one device), mirrored (one replica "
        "per GPU, or per logical CPU device), multi_worker (cluster from "
        "TF_CONFIG; the chief writes checkpoints, logs and reports) or tpu "
        "(untested). --batch_size is the global batch, split evenly over "
        "the replicas.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_cpu_devices",
        default("num_cpu_devices"),
        "Split the CPU into "
        "this many logical devices before TensorFlow starts (local "
        "multi-replica runs and tests); 0 keeps the device setup.",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "sync_bn",
        default("sync_bn"),
        "Make every BN layer synchronized: "
        "batch statistics of the global batch across replicas. Without "
        "it each replica normalizes with its local batch and the moving "
        "statistics take the mean of the replicas' updates.",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "allow_changed_flags",
        default("allow_changed_flags"),
        "Resume a run in --model_dir even though flags that change its trajectory "
        "(seed, learning rate, optimizer, dataset, model, BN or pattern flags, batch "
        "size, strategy, ...) differ from the ones it was saved with; the change is "
        "recorded in flags.txt and run_config.json. Raising --train_steps needs no "
        "override.",
        flag_values=fv,
    )
    flags.mark_flag_as_required("model_dir", flag_values=fv)

    for name, check in config_lib.FIELD_CHECKS.items():
        if name in fv:
            _register(fv, name, check)
    flags.register_multi_flags_validator(
        ["restore_part", "init_checkpoint"],
        lambda values: not values["restore_part"] or bool(values["init_checkpoint"]),
        message="--restore_part needs --init_checkpoint (there is nothing to restore from).",
        flag_values=fv,
    )


def _register(fv: flags.FlagValues, name: str, check) -> None:
    def validator(value):
        if isinstance(value, list):
            value = tuple(value)
        message = check(value)
        if message:
            raise flags.ValidationError(f"--{name} {message}; received {value!r}.")
        return True

    flags.register_validator(name, validator, flag_values=fv)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> config_lib.TrainConfig:
    """Builds the `TrainConfig` from parsed flags.

    Args:
        flag_values: Parsed flags defined by `define_flags`.

    Returns:
        The validated, immutable config.
    """
    values = {}
    for field in dataclasses.fields(config_lib.TrainConfig):
        value = flag_values[field.name].value
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return config_lib.TrainConfig(**values)


# Library errors quote argument names in backticks: `update_part`.
_QUOTED_NAME = re.compile(r"`([a-z_]+)`")


def as_flag_message(message: str) -> str:
    """Rewrites every quoted config field name (`update_part`) as its flag (--update_part).

    Config field names are the flag names, so a library error that names the
    Python argument names the flag once rewritten. Other quoted names stay.

    Args:
        message: A library error message.

    Returns:
        The message in the command line's terms.
    """
    fields = {field.name for field in dataclasses.fields(config_lib.TrainConfig)}
    return _QUOTED_NAME.sub(
        lambda match: f"--{match[1]}" if match[1] in fields else match[0], message
    )
