"""Tests for tfbn.config.TrainConfig validation and flagfile serialisation."""

import pytest

from tfbn.finetune.config import TrainConfig


def test_defaults_are_valid():
    config = TrainConfig(model_dir="/tmp/run")
    assert config.frozen_bn_mode == "inference" and config.update_part == ()
    assert config.resolved_export_dir() == "/tmp/run/export"


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_dir", ""),
        ("batch_size", 1),
        ("train_steps", 0),
        ("learning_rate", 0.0),
        ("weight_decay", -1.0),
        ("bn_momentum", 1.0),
        ("bn_epsilon", 0.0),
        ("frozen_bn_mode", "frozen"),
        ("optimizer", "lbfgs"),
        ("lr_schedule", "linear"),
        ("update_part", ("head/[",)),
        ("freeze_part", ("",)),
        ("checkpoint_interval", 0),
        ("eval_interval", -1),
        ("verbose", 3),
        ("strategy", "horovod"),
        ("num_cpu_devices", -1),
    ],
)
def test_bad_values_name_the_field(field, value):
    kwargs = {"model_dir": "/tmp/run", field: value}
    with pytest.raises(ValueError, match=f"`{field}`"):
        TrainConfig(**kwargs)


def test_restore_part_needs_init_checkpoint():
    with pytest.raises(ValueError, match="`restore_part` needs `init_checkpoint`"):
        TrainConfig(model_dir="/tmp/run", restore_part=("backbone/",))


def test_config_is_frozen():
    config = TrainConfig(model_dir="/tmp/run")
    with pytest.raises(AttributeError):
        config.batch_size = 4


def test_to_flagfile_lists_repeated_and_boolean_flags():
    text = TrainConfig(
        model_dir="/tmp/run", update_part=("head/", "neck/"), export=False
    ).to_flagfile()
    lines = text.splitlines()
    assert "--update_part=head/" in lines and "--update_part=neck/" in lines
    assert "--noexport" in lines and "--nodry_run" in lines
    assert not any(line.startswith("--init_checkpoint") for line in lines)
