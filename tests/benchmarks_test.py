"""Smoke run of every benchmark script: one tiny case each, no timing claims.

This keeps the scripts alive (they import, run and write BENCHMARKS.md-style
output); it says nothing about speed.
"""

import numpy as np
import pytest

from benchmarks import common, layer, models, report, run_all, targets


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


def test_models_smoke_rows_are_relative_to_no_bn():
    rows = models.run(repeats=1, smoke=True)
    contenders = ["tfbn", "stock keras BN", "no BN", "fused kernel only"]
    assert [row.contender for row in rows] == contenders
    assert [row.ratio for row in rows if row.contender == "no BN"] == [1.0]
    assert all(row.median_ms > 0 for row in rows)


def test_models_replacements_keep_the_graph_and_drop_or_swap_every_bn_layer():
    keras = models.keras
    stock = models.tiny_residual_network((8, 8, 3))
    images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    plain = models.without_batch_norm(stock)
    kernel_only = models.replace_batch_norm(stock, lambda layer: models.FusedKernelOnly())
    for clone in (plain, kernel_only):
        assert len(clone.layers) == len(stock.layers)
        assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in clone.layers)
    # The pass-through returns its input unchanged.
    pass_through = next(layer for layer in plain.layers if isinstance(layer, models.PassThrough))
    probe = keras.Model(plain.inputs, [pass_through.input, pass_through.output])
    before, after = probe(images)
    assert np.array_equal(before, after)
    # The bare kernel normalizes each channel with the batch's biased variance.
    layer = models.FusedKernelOnly(epsilon=1e-3)
    outputs = np.asarray(layer(images))
    mean = images.mean(axis=(0, 1, 2))
    expected = (images - mean) / np.sqrt(images.var(axis=(0, 1, 2)) + 1e-3)
    np.testing.assert_allclose(outputs, expected, atol=1e-5)


def test_population_statistics_smoke_rows_compare_with_inference_passes():
    from benchmarks import population_statistics

    rows = population_statistics.run(repeats=1, smoke=True)
    assert [row.contender for row in rows] == ["recompute_statistics", "2 inference passes"]
    assert rows[1].ratio == 1.0 and rows[0].ratio == rows[0].median_ms / rows[1].median_ms
    assert "first call" in rows[0].note
    results = [r for r in targets.evaluate(rows) if r.benchmark == "population_statistics"]
    assert [(r.contender, r.ratio) for r in results] == [("recompute_statistics", rows[0].ratio)]


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
        "(6) BN's share of whole-model training steps",
    ):
        assert expected in text
    # Every target of the one table is listed, with its limit, and judged.
    for target in targets.TARGETS:
        assert f"{target.name} {target.comparison}" in text
        assert f"| {target.benchmark}: {target.name} |" in text


def _synthetic_rows():
    """Rows as the layer, training-step and trainer benchmarks produce them."""
    layer_case = "8x4x4x16 fwd+bwd function"
    medians = {"tfbn": 2.0, "keras": 8.0, "raw fused op": 2.5, "copy": 1.0}
    rows = common.rows_with_ratios("layer", layer_case, medians, "keras")
    rows += common.rows_with_ratios(
        "layer", "64x32 fwd function", {"tfbn": 3.0, "keras": 4.0}, "keras"
    )
    step = {"tfbn BN": 9.0, "stock keras BN": 10.0, "no BN": 8.0}
    rows += common.rows_with_ratios("training_step", "6x step", step, "stock keras BN")
    fit = {"tfbn trainer": 5.0, "model.fit": 4.0}
    rows += common.rows_with_ratios("trainer", "10 steps", fit, "model.fit")
    return rows, medians, step, fit


def test_targets_turn_rows_into_ratios_against_their_reference():
    rows, layer_ms, step_ms, fit_ms = _synthetic_rows()
    results = {(r.name, r.config): r for r in targets.evaluate(rows)}
    limits = {target.name: target.limit for target in targets.TARGETS}

    def check(name, config, expected, higher_is_better=False):
        result = results[(name, config)]
        assert result.ratio == pytest.approx(expected)
        assert result.target == limits[name]
        met = expected >= limits[name] if higher_is_better else expected <= limits[name]
        assert result.met is met

    case = "8x4x4x16 fwd+bwd function"
    check("fwd+bwd vs keras (4D)", case, layer_ms["tfbn"] / layer_ms["keras"])
    check("fwd+bwd vs the raw fused op", case, layer_ms["tfbn"] / layer_ms["raw fused op"])
    # 5 tensor passes in the row's time against the copy's 2.
    share = (5 / layer_ms["tfbn"]) / (2 / layer_ms["copy"])
    check("fwd+bwd share of the copy bandwidth", case, share, higher_is_better=True)
    check("fwd vs keras (2D)", "64x32 fwd function", 3.0 / 4.0)
    check(
        "train step vs stock-BN network", "6x step", step_ms["tfbn BN"] / step_ms["stock keras BN"]
    )
    check("train step vs no-BN network", "6x step", step_ms["tfbn BN"] / step_ms["no BN"])
    steps_per_second = (1 / fit_ms["tfbn trainer"]) / (1 / fit_ms["model.fit"])
    check("trainer steps/s vs model.fit", "10 steps", steps_per_second, higher_is_better=True)
    # Targets without rows are reported as not measured, not dropped.
    missing = results[("inference vs keras", "not measured")]
    assert missing.ratio is None and missing.met is None


def test_the_targets_table_is_the_only_source_of_limits():
    names = [target.name for target in targets.TARGETS]
    assert len(names) == len(set(names))
    rows, *_ = _synthetic_rows()
    results = targets.evaluate(rows)
    table = report.rows_table(rows, results)
    for result in results:
        if result.ratio is not None:
            # The figure stands next to its target in the row's line.
            line = next(
                line
                for line in table.splitlines()
                if line.startswith(f"| {result.config} | {result.contender} |")
            )
            assert f"{result.name}: {result.ratio:.2f} ({result.comparison})" in line
