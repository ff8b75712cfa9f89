"""Smoke run of every benchmark script: one tiny case each, no timing claims.

This keeps the scripts alive (they import, run and write BENCHMARKS.md-style
output); it says nothing about speed.
"""

import pathlib
import sys

# `benchmarks/` is a top-level folder of the repository, not an installed
# package; `python -m pytest` from the root finds it, plain `pytest` may not.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import common, layer, run_all  # noqa: E402


def test_time_interleaved_calls_each_contender_warmup_plus_repeats_times():
    calls = {"a": 0, "b": 0}

    def counter(name):
        def call():
            calls[name] += 1

        return call

    medians = common.time_interleaved({"a": counter("a"), "b": counter("b")}, repeats=3, warmup=2)
    assert calls == {"a": 5, "b": 5}
    assert set(medians) == {"a", "b"} and all(value >= 0 for value in medians.values())


def test_layer_smoke_rows_have_every_contender_and_keras_as_baseline():
    rows = layer.run(repeats=1, smoke=True)
    forward_backward = [row for row in rows if row.case == "4x3x3x8 fwd+bwd function"]
    assert [row.contender for row in forward_backward] == ["tfbn", "keras", "raw fused op", "copy"]
    assert [row.ratio for row in forward_backward if row.contender == "keras"] == [1.0]
    assert any("renorm" in row.case for row in rows)
    assert all(row.median_ms > 0 for row in rows)


def test_run_all_smoke_writes_the_report(tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    run_all.main(["--smoke", "--repeats", "1", "--output", str(output)])
    text = output.read_text()
    for expected in (
        "## Machine",
        "oneDNN:",
        "tensorflow: ",
        "Conv-BN-ReLU train step",
        "(4) Inference",
        "(5) Trainer",
    ):
        assert expected in text
