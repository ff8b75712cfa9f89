"""Tests for tfbn.config.TrainConfig validation and flagfile serialisation."""

import pytest

from tfbn.finetune.config import MAX_LEARNING_RATE, TrainConfig


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


@pytest.mark.parametrize(
    "field, value",
    [
        ("learning_rate", float("inf")),
        ("learning_rate", float("nan")),
        ("learning_rate", 1e30),
        ("weight_decay", float("inf")),
        ("weight_decay", float("nan")),
        ("bn_epsilon", float("inf")),
        ("bn_epsilon", float("nan")),
        ("bn_momentum", float("nan")),
        ("bn_momentum", float("inf")),
    ],
)
def test_non_finite_and_absurd_hyperparameters_are_rejected(field, value):
    with pytest.raises(ValueError, match=f"`{field}`: must .*finite|`{field}`: must be in"):
        TrainConfig(model_dir="/tmp/run", **{field: value})


def test_learning_rate_bound_and_skip_limit_accept_their_edges():
    config = TrainConfig(
        model_dir="/tmp/run",
        learning_rate=MAX_LEARNING_RATE,
        weight_decay=0.0,
        bn_epsilon=1e-12,
        max_consecutive_skipped_steps=0,
    )
    assert (config.learning_rate, config.max_consecutive_skipped_steps) == (100.0, 0)
    assert TrainConfig(model_dir="/tmp/run").max_consecutive_skipped_steps == 100
    with pytest.raises(ValueError, match="`max_consecutive_skipped_steps`"):
        TrainConfig(model_dir="/tmp/run", max_consecutive_skipped_steps=-1)
