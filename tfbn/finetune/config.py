"""`TrainConfig`: the typed, validated configuration of one `train.py` run.

The field names are the flag names, and every check lives here once:
`tfbn.flags` registers these checks as absl validators, and the dataclass
runs them again so a config built in Python is held to the same rules.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zipfile
from collections.abc import Callable

from tfbn.nn import arguments as bn_arguments

FROZEN_BN_MODES = ("inference", "batch", "adapt")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop")
LR_SCHEDULES = ("constant", "cosine", "step")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
# No optimizer of train.py converges with a larger peak learning rate; a value
# above it is a typo (1e30 for 1e-3) that would end in NaN weights or a dead model.
MAX_LEARNING_RATE = 100.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; see `tfbn/finetune/flags.py` for the help texts.

    Pattern fields are tuples of regexes `re.match`-ed against Keras variable
    paths (`backbone/conv1/kernel`); an empty `update_part` means the whole
    model.
    """

    model_dir: str
    model: str = "tiny_darknet"
    dataset: str = "tfbn_shapes/source"
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    image_size: int = 32
    batch_size: int = 32
    train_steps: int = 200
    optimizer: str = "momentum"
    learning_rate: float = 0.05
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    init_checkpoint: str | None = None
    restore_part: tuple[str, ...] = ()
    restore_exclude: tuple[str, ...] = ()
    update_part: tuple[str, ...] = ()
    freeze_part: tuple[str, ...] = ()
    frozen_bn_mode: str = "inference"
    freeze_batchnorm: bool = False
    bn_momentum: float | None = None
    bn_epsilon: float | None = None
    checkpoint_interval: int = 100
    max_to_keep: int = 3
    eval_interval: int = 0
    eval_batches: int = 0
    summary_interval: int = 10
    max_consecutive_skipped_steps: int = 100
    seed: int = 0
    verbose: int = 1
    dry_run: bool = False
    export_dir: str | None = None
    export: bool = True
    strategy: str = "default"
    num_cpu_devices: int = 0
    sync_bn: bool = False
    allow_changed_flags: bool = False

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check = FIELD_CHECKS.get(field.name)
            if check is not None:
                message = check(getattr(self, field.name))
                if message:
                    raise ValueError(
                        f"`{field.name}`: {message} (received {getattr(self, field.name)!r})."
                    )
        if self.restore_part and not self.init_checkpoint:
            raise ValueError(
                "`restore_part` needs `init_checkpoint`: there is nothing to restore "
                f"from (received restore_part={list(self.restore_part)})."
            )

    def to_flagfile(self) -> str:
        """The config in absl flagfile syntax (`train.py --flagfile=` reads it back).

        Returns:
            One `--name=value` line per set field.
        """
        lines = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                lines.extend(f"--{field.name}={item}" for item in value)
            elif isinstance(value, bool):
                lines.append(f"--{'' if value else 'no'}{field.name}")
            elif value is not None:
                lines.append(f"--{field.name}={value}")
        return "\n".join(lines) + "\n"

    def resolved_export_dir(self) -> str:
        """Where the final model is exported.

        Returns:
            `export_dir`, or `<model_dir>/export` when it is not set.
        """
        return self.export_dir or os.path.join(self.model_dir, "export")


def _positive_int(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return "must be an integer >= 1"
    return None


def _non_negative_int(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return "must be an integer >= 0 (0 disables it)"
    return None


def _choice(choices) -> Callable[[object], str | None]:
    def check(value):
        return None if value in choices else f"must be one of {list(choices)}"

    return check


def _patterns(value) -> str | None:
    for pattern in value or ():
        try:
            re.compile(pattern)
        except re.error as error:
            return f"pattern {pattern!r} is not a valid regex ({error})"
        if not pattern:
            return "an empty pattern matches everything; drop it instead"
    return None


def _model(value) -> str | None:
    if not value:
        return "is required: a registered name, 'package.module:function' or a .keras file"
    if value.endswith(".keras"):
        if not os.path.isfile(value):
            return (
                "names a .keras file that does not exist (save the model with "
                "model.save('name.keras'))"
            )
        if not zipfile.is_zipfile(value):
            return "names a file that is not a .keras archive (save it with model.save)"
    return None


def _model_dir(value) -> str | None:
    return None if value else "is required: the directory for checkpoints, logs and reports"


def _batch_size(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        return "must be an integer >= 2 (batch statistics need two samples)"
    return None


def _learning_rate(value) -> str | None:
    if math.isfinite(value) and 0 < value <= MAX_LEARNING_RATE:
        return None
    return (
        f"must be a finite number in (0, {MAX_LEARNING_RATE:g}]; larger rates diverge "
        "with every optimizer here (typical values: 0.1 for SGD, 1e-3 for Adam)"
    )


def _weight_decay(value) -> str | None:
    if math.isfinite(value) and value >= 0:
        return None
    return "must be a finite number >= 0 (0 disables it; typical values: 1e-4 to 5e-4)"


def _bn_momentum(value) -> str | None:
    if value is None or 0.0 <= value < 1.0:
        return None
    return (
        "must be in [0, 1) (Keras convention: moving = momentum * moving + "
        "(1 - momentum) * batch; PyTorch's 0.1 is 0.9 here)"
    )


def _bn_epsilon(value) -> str | None:
    if value is None:
        return None
    if not value > 0:  # NaN too; the layer allows 0, an override must not.
        return "must be a finite number > 0 (e.g. 1e-3)"
    try:
        bn_arguments.epsilon(value, "bn_epsilon")
    except ValueError:
        return "must be a finite number > 0 (e.g. 1e-3)"
    return None


def _image_size(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 8:
        return "must be an integer >= 8"
    return None


def _verbose(value) -> str | None:
    return (
        None
        if value in (0, 1, 2)
        else "must be 0 (quiet), 1 (progress bar) or 2 (one line per log)"
    )


FIELD_CHECKS: dict[str, Callable[[object], str | None]] = {
    "model_dir": _model_dir,
    "model": _model,
    "image_size": _image_size,
    "batch_size": _batch_size,
    "train_steps": _positive_int,
    "optimizer": _choice(OPTIMIZERS),
    "learning_rate": _learning_rate,
    "lr_schedule": _choice(LR_SCHEDULES),
    "weight_decay": _weight_decay,
    "restore_part": _patterns,
    "restore_exclude": _patterns,
    "update_part": _patterns,
    "freeze_part": _patterns,
    "frozen_bn_mode": _choice(FROZEN_BN_MODES),
    "bn_momentum": _bn_momentum,
    "bn_epsilon": _bn_epsilon,
    "checkpoint_interval": _positive_int,
    "max_to_keep": _positive_int,
    "eval_interval": _non_negative_int,
    "eval_batches": _non_negative_int,
    "summary_interval": _positive_int,
    "max_consecutive_skipped_steps": _non_negative_int,
    "seed": _non_negative_int,
    "verbose": _verbose,
    "strategy": _choice(STRATEGIES),
    "num_cpu_devices": _non_negative_int,
}
