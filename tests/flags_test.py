"""Tests for tfbn.finetune.flags: definitions, validators, FLAGS -> config, error wording."""

import os
import subprocess
import tempfile

import numpy as np
import pytest
import tensorflow as tf
import train_py
from absl import flags

from tfbn.finetune import flags as tfbn_flags
from tfbn.finetune.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(tempfile.gettempdir(), "tfbn_test_data")


def parse(*argv):
    fv = flags.FlagValues()
    tfbn_flags.define_flags(fv)
    fv(["train.py", *argv])
    return tfbn_flags.config_from_flags(fv)


def test_flags_build_the_typed_config():
    config = parse(
        "--model_dir=/tmp/r",
        "--update_part=head/",
        "--update_part=neck/",
        "--frozen_bn_mode=batch",
        "--bn_momentum=0.9",
        "--batch_size=8",
    )
    assert isinstance(config, TrainConfig)
    assert config.update_part == ("head/", "neck/")
    assert (config.frozen_bn_mode, config.bn_momentum, config.batch_size) == ("batch", 0.9, 8)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--batch_size=1"], "--batch_size"),
        (["--bn_momentum=1.5"], "--bn_momentum"),
        (["--bn_epsilon=-1"], "--bn_epsilon"),
        (["--update_part=head/["], "--update_part"),
        (["--restore_exclude=("], "--restore_exclude"),
        (["--learning_rate=0"], "--learning_rate"),
        (["--frozen_bn_mode=frozen"], "frozen_bn_mode"),
        (["--restore_part=backbone/"], "--restore_part"),
        (["--strategy=horovod"], "strategy"),
        (["--num_cpu_devices=-1"], "--num_cpu_devices"),
        (["--learning_rate=inf"], "--learning_rate must be a finite number"),
        (["--learning_rate=1e30"], "--learning_rate must be a finite number in"),
        (["--weight_decay=inf"], "--weight_decay must be a finite number"),
        (["--bn_epsilon=inf"], "--bn_epsilon must be a finite number"),
        (["--bn_epsilon=nan"], "--bn_epsilon must be a finite number"),
        (["--max_consecutive_skipped_steps=-1"], "--max_consecutive_skipped_steps"),
    ],
)
def test_validators_reject_bad_values_naming_the_flag(argv, flag):
    with pytest.raises(flags.Error, match=flag.replace("[", r"\[")):
        parse("--model_dir=/tmp/r", *argv)


def test_distribution_flags():
    config = parse("--model_dir=/tmp/r", "--strategy=mirrored", "--num_cpu_devices=2", "--sync_bn")
    assert (config.strategy, config.num_cpu_devices, config.sync_bn) == ("mirrored", 2, True)
    assert (parse("--model_dir=/tmp/r").strategy, parse("--model_dir=/tmp/r").sync_bn) == (
        "default",
        False,
    )


def test_model_dir_is_required():
    with pytest.raises(flags.IllegalFlagValueError, match="model_dir"):
        parse("--batch_size=4")


@pytest.mark.parametrize("name", ["pretrain", "finetune_head", "smoke"])
def test_configs_parse_and_start_with_their_command(name):
    path = os.path.join(REPO, "configs", f"{name}.flags")
    with open(path) as stream:
        first = stream.readline()
    assert first.startswith(f"# python train.py --flagfile=configs/{name}.flags")
    extra = ["--init_checkpoint=/tmp/pre"] if name == "finetune_head" else []
    config = parse(f"--flagfile={path}", "--model_dir=/tmp/r", *extra)
    assert config.model_dir == "/tmp/r"


def test_finetune_config_trains_only_the_head():
    config = parse(
        f"--flagfile={REPO}/configs/finetune_head.flags",
        "--model_dir=/tmp/r",
        "--init_checkpoint=/tmp/pre",
    )
    assert config.update_part == ("head/",) and config.restore_part == ("backbone/",)
    assert config.dataset == "tfbn_shapes/target" and config.frozen_bn_mode == "inference"


def test_flagfile_written_by_a_run_parses_back_to_the_same_config(tmp_path):
    config = parse(
        "--model_dir=/tmp/r",
        "--update_part=head/",
        "--init_checkpoint=/tmp/p",
        "--restore_part=backbone/",
        "--noexport",
        "--eval_split=test",
    )
    path = tmp_path / "flags.txt"
    path.write_text(config.to_flagfile())
    assert parse(f"--flagfile={path}") == config


def test_library_messages_are_reworded_with_flag_names():
    message = "`update_part` pattern 'x' ...; exclude it with `restore_exclude`; `layers` too."
    assert tfbn_flags.as_flag_message(message) == (
        "--update_part pattern 'x' ...; exclude it with --restore_exclude; `layers` too."
    )


def test_train_py_ends_a_pattern_that_matches_nothing_with_a_usage_error(tmp_path):
    process = subprocess.run(
        train_py.command(
            f"--model_dir={tmp_path}",
            f"--data_dir={DATA_DIR}",
            "--update_part=hed/",
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 1
    assert "--update_part pattern 'hed/' matches no variable" in process.stderr + process.stdout
    assert "Traceback" not in process.stderr


def test_train_py_rejects_an_infinite_learning_rate_before_training(tmp_path):
    process = subprocess.run(
        train_py.command(
            f"--model_dir={tmp_path / 'run'}",
            "--learning_rate=inf",
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 1
    assert "--learning_rate must be a finite number" in process.stderr
    assert "Traceback" not in process.stderr
    assert not (tmp_path / "run").exists()


def test_train_py_reports_an_image_folder_class_mismatch_as_a_dataset_usage_error(tmp_path):
    for split, classes in (("train", ("Cat", "Dog")), ("val", ("Cat", "dog"))):
        for name in classes:
            directory = tmp_path / "images" / split / name
            directory.mkdir(parents=True)
            pixels = np.full((8, 8, 3), 128, np.uint8)
            tf.io.write_file(str(directory / "0.jpg"), tf.io.encode_jpeg(pixels))
    process = subprocess.run(
        train_py.command(
            f"--model_dir={tmp_path / 'run'}",
            f"--dataset=folder:{tmp_path / 'images'}",
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 1
    assert "--dataset 'folder:" in process.stderr
    assert "only in 'train': ['Dog']; only in 'val': ['dog']" in process.stderr
    assert "Traceback" not in process.stderr
