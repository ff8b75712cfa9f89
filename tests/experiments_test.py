"""Smoke tests: every experiment runs at a tiny size and writes its files."""

import csv
import os

import numpy as np
import pytest

from tfbn import experiments
from tfbn.experiments import common, small_batch


def _config(tmp_path, data_dir, **overrides):
    values = {
        "output_dir": str(tmp_path),
        "scale": 0.01,
        "image_size": 8,
        "data_dir": data_dir,
        "progress": False,
    }
    values.update(overrides)
    return experiments.ExperimentConfig(**values)


@pytest.mark.parametrize("name", ["convergence", "learning_rate", "small_batch", "statistics"])
def test_each_experiment_writes_csv_markdown_and_plots(name, tmp_path, tfds_data_dir, monkeypatch):
    # Two batch sizes are enough to exercise the sweep.
    monkeypatch.setattr(small_batch, "BATCH_SIZES", (4, 16))
    paths = experiments.run_experiment(name, _config(tmp_path, tfds_data_dir))
    names = sorted(os.path.basename(p) for p in paths)
    assert f"{name}.csv" in names and f"{name}.md" in names
    assert any(n.endswith(".png") for n in names)
    with open(tmp_path / f"{name}.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows
    accuracies = [float(v) for row in rows for k, v in row.items() if "accuracy" in k]
    assert accuracies and all(0.0 <= a <= 1.0 for a in accuracies)
    if name == "statistics":
        assert [row["momentum"] for row in rows] == ["0.9", "0.99", "0.999", "cumulative (None)"]
    markdown = (tmp_path / f"{name}.md").read_text()
    for png in (n for n in names if n.endswith(".png")):
        assert f"]({png})" in markdown
        assert os.path.getsize(tmp_path / png) > 1000


def test_without_matplotlib_csv_and_markdown_are_still_written(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_draw_plots", lambda plots, output_dir: [])
    result = common.ExperimentResult(
        "demo",
        [{"step": 1, "accuracy": 0.5}, {"step": 2, "accuracy": 0.75}],
        "Summary.",
        [common.Plot("demo.png", "t", "x", "y", {"a": ([1, 2], [0.5, 0.75])})],
    )
    paths = common.write_result(result, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["demo.csv", "demo.md"]
    assert "install matplotlib" in (tmp_path / "demo.md").read_text()
    with open(tmp_path / "demo.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["accuracy"]) for r in rows] == [0.5, 0.75]


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="scale"):
        experiments.ExperimentConfig(output_dir="x", scale=0)
    with pytest.raises(ValueError, match="output_dir"):
        experiments.ExperimentConfig(output_dir="")
    with pytest.raises(ValueError, match="convergence"):
        experiments.get_experiment("convergance")


def test_convergence_is_seeded_and_reproducible(tmp_path, tfds_data_dir):
    run = experiments.get_experiment("convergence")
    first = run(_config(tmp_path / "a", tfds_data_dir))
    second = run(_config(tmp_path / "b", tfds_data_dir))
    for a, b in zip(first.rows, second.rows):
        assert a.keys() == b.keys()
        assert np.allclose(
            [a[k] for k in a if k != "model"], [b[k] for k in b if k != "model"], equal_nan=True
        )


def test_finetune_shift_keeps_inference_mode_backbone_frozen(tmp_path, tfds_data_dir):
    paths = experiments.run_experiment(
        "finetune_shift", _config(tmp_path, tfds_data_dir, image_size=16)
    )
    assert any(p.endswith("finetune_shift.png") for p in paths)
    with open(tmp_path / "finetune_shift.csv") as handle:
        rows = {row["variant"]: row for row in csv.DictReader(handle)}
    assert list(rows) == [
        "pretrained, no fine-tune",
        "inference",
        "batch",
        "adapt",
        "recompute, then inference",
    ]
    # Frozen statistics stay bit-identical in inference and batch mode; adapt
    # and the recomputation move them towards the target domain.
    assert float(rows["inference"]["backbone_stat_drift"]) == 0.0
    assert float(rows["batch"]["backbone_stat_drift"]) == 0.0
    assert float(rows["adapt"]["backbone_stat_drift"]) > 0.0
    assert float(rows["recompute, then inference"]["backbone_stat_drift"]) > 0.0
