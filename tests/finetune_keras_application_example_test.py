"""The keras.applications fine-tune example runs end to end and keeps frozen weights frozen."""

import importlib.util
import os

import keras
import numpy as np
from trainer_test import DATA_DIR

from tfbn.layers import introspection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_example():
    spec = importlib.util.spec_from_file_location(
        "finetune_keras_application",
        os.path.join(REPO, "examples", "finetune_keras_application.py"),
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_finetunes_mobilenet_and_keeps_the_rest_bit_identical(tmp_path, capsys):
    example = _load_example()
    summary = example.main(str(tmp_path), steps=3, data_dir=DATA_DIR)
    assert "bit-identical to the file: yes" in capsys.readouterr().out
    # Checked again here, independently of the example's own check.
    original = keras.saving.load_model(tmp_path / "mobilenet_v2.keras")
    tuned = keras.saving.load_model(tmp_path / "fine_tuned.keras")
    before = introspection.nested_variable_paths(original)
    after = introspection.nested_variable_paths(tuned)
    assert list(after) == list(before)
    changed = [p for p in before if not np.array_equal(after[p].numpy(), before[p].numpy())]
    assert set(changed) <= {p for p in before if p.startswith(("Conv_1", "predictions"))}
    assert "predictions/kernel" in changed and "Conv_1_bn/moving_mean" in changed
    assert summary["frozen_identical"] and summary["trained"] == 7
    modes = summary["bn_modes"]
    assert modes.pop("Conv_1_bn") == "train"
    assert len(modes) == 51 and set(modes.values()) == {"inference"}
