"""Tests for tfbn.tools.cli (`tfbn-tools`), run in-process on saved `.keras` models."""

import json
import os

import keras
import numpy as np
import pytest

import tfbn
from tfbn.tools import cli as tools_cli
from tfbn.tools import conversion, population_statistics
from tfbn.tools.population_statistics import population_moments

L = keras.layers


@pytest.fixture()
def saved_model(tmp_path):
    inputs = keras.Input((5,))
    x = L.Dense(4, name="dense")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, tfbn.BatchNormalization(name="bn_top")(L.ReLU()(x)))
    rng = np.random.default_rng(0)
    data = rng.normal(2.0, 3.0, (10, 5)).astype("float32")
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    np.save(os.path.join(tmp_path, "data.npy"), data)
    return path, data, tmp_path


def test_recompute_then_fold_then_convert(saved_model, capsys):
    path, data, tmp = saved_model
    recomputed, folded, converted = (os.path.join(tmp, f"{n}.keras") for n in "rfc")

    assert (
        tools_cli.main(
            [
                "recompute-statistics",
                path,
                recomputed,
                "--data",
                os.path.join(tmp, "data.npy"),
                "--batch-size",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    model = keras.models.load_model(recomputed)
    batches = [data[:4], data[4:8], data[8:]]
    stats = population_moments(model, batches)
    bn_mean = model.get_layer("bn").moving_mean.numpy()
    np.testing.assert_allclose(bn_mean, stats["bn"].mean, rtol=1e-5, atol=1e-6)

    assert tools_cli.main(["fold", recomputed, folded]) == 0
    out = capsys.readouterr().out
    assert "folded bn into dense" in out
    # bn_top reads a ReLU: kept, with the reason's stable code, and counted.
    assert "kept bn_top as ChannelAffine [unfoldable_producer]: " in out
    assert "1 of 2 BN layers folded; kept unfoldable_producer: 1" in out
    np.testing.assert_allclose(
        keras.models.load_model(folded)(data), model(data, training=False), rtol=1e-5, atol=1e-5
    )

    assert tools_cli.main(["convert", recomputed, converted, "--to", "tfbn"]) == 0
    assert isinstance(keras.models.load_model(converted).get_layer("bn"), tfbn.BatchNormalization)


def test_audit_writes_json_and_fails_on_errors(saved_model):
    path, data, tmp = saved_model
    np.savez(os.path.join(tmp, "data.npz"), inputs=data, labels=np.zeros(10))
    report_path = os.path.join(tmp, "report.json")
    argv = [
        "audit",
        path,
        "--data",
        os.path.join(tmp, "data.npz"),
        "--data-key",
        "inputs",
        "--format",
        "json",
        "--output",
        report_path,
    ]
    assert tools_cli.main(argv) == 0
    with open(report_path) as handle:
        checks = {(f["layer"], f["check"]) for f in json.load(handle)["findings"]}
    assert ("dense", "bias_before_bn") in checks
    assert ("bn", "statistics_mismatch") in checks

    model = keras.models.load_model(path)
    model.get_layer("bn").moving_variance.assign([-1.0, 1.0, 1.0, 1.0])
    model.save(path)
    assert tools_cli.main(["audit", path, "--fail-on-error", "--output", report_path]) == 1


def test_ambiguous_npz_needs_a_key(saved_model):
    _, data, tmp = saved_model
    archive = os.path.join(tmp, "two.npz")
    np.savez(archive, a=data, b=data)
    with pytest.raises(ValueError, match="--data-key"):
        tools_cli.load_batches(archive, 4)


def _one_line_error(capsys):
    """The stderr of a failed command: exactly one line, no traceback."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert lines[0].startswith("tfbn-tools: error: ")
    return lines[0]


def test_missing_model_file_is_a_one_line_error(saved_model, capsys):
    _, _, tmp = saved_model
    missing = os.path.join(tmp, "missing.keras")
    assert tools_cli.main(["fold", missing, os.path.join(tmp, "out.keras")]) == 2
    line = _one_line_error(capsys)
    assert missing in line and "does not exist" in line


@pytest.mark.parametrize("content", [b"not a zip archive", b""])
def test_existing_but_invalid_model_file_is_called_invalid(saved_model, capsys, content):
    _, _, tmp = saved_model
    broken = os.path.join(tmp, "broken.keras")
    with open(broken, "wb") as handle:
        handle.write(content)
    assert tools_cli.main(["audit", broken]) == 2
    line = _one_line_error(capsys)
    assert "invalid" in line and broken in line
    assert "not found" not in line.lower()


def test_missing_and_invalid_data_files(saved_model, capsys):
    path, _, tmp = saved_model
    out = os.path.join(tmp, "out.keras")
    missing = os.path.join(tmp, "missing.npy")
    assert tools_cli.main(["recompute-statistics", path, out, "--data", missing, "--quiet"]) == 2
    assert "does not exist" in _one_line_error(capsys)
    pickled = os.path.join(tmp, "objects.npy")
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert tools_cli.main(["recompute-statistics", path, out, "--data", pickled, "--quiet"]) == 2
    assert "invalid" in _one_line_error(capsys)
    assert not os.path.exists(out)


@pytest.mark.parametrize("shape", [(10,), (10, 5, 1), (10, 7)])
def test_wrong_shape_data_names_both_shapes_without_the_array(saved_model, capsys, shape):
    path, _, tmp = saved_model
    data = np.full(shape, 123456.0, np.float32)  # A value that must not be printed.
    data_path = os.path.join(tmp, "wrong.npy")
    np.save(data_path, data)
    out = os.path.join(tmp, "out.keras")
    argv = ["recompute-statistics", path, out, "--data", data_path, "--quiet"]
    assert tools_cli.main(argv) == 2
    line = _one_line_error(capsys)
    assert f"rank {len(shape)}" in line and "rank 2" in line
    assert "123456" not in line
    assert tools_cli.main(["audit", path, "--data", data_path]) == 2
    assert "rank 2" in _one_line_error(capsys)


def test_library_errors_are_reported_with_flag_names(saved_model, capsys):
    path, _, tmp = saved_model
    data_path = os.path.join(tmp, "data.npy")
    out = os.path.join(tmp, "out.keras")
    base = ["recompute-statistics", path, out, "--data", data_path, "--quiet"]
    assert tools_cli.main(base + ["--num-batches", "0"]) == 2
    line = _one_line_error(capsys)
    assert "--num-batches" in line and "`num_batches`" not in line
    # 10 rows in batches of 4 are 3 batches, fewer than asked for.
    assert tools_cli.main(base + ["--batch-size", "4", "--num-batches", "5"]) == 2
    line = _one_line_error(capsys)
    assert "--num-batches" in line and "num_batches" not in line
    assert not os.path.exists(out)


def test_the_library_names_python_arguments_not_flags(saved_model):
    path, data, _ = saved_model
    model = keras.models.load_model(path)
    with pytest.raises(ValueError) as error:
        population_statistics.recompute_statistics(model, [data], num_batches=0, progress=False)
    assert "`num_batches`" in str(error.value) and "--" not in str(error.value)
    with pytest.raises(ValueError) as error:
        population_statistics.recompute_statistics(model, [data], num_batches=3, progress=False)
    assert "num_batches" in str(error.value) and "--" not in str(error.value)
    with pytest.raises(ValueError) as error:
        conversion.convert_batch_norm(model, to="torch")
    assert "`to`" in str(error.value) and "--" not in str(error.value)


def test_flag_message_translates_only_argument_names():
    message = "`num_batches`=5 but only 3 batches. Pass a smaller num_batches; `to` must be ..."
    assert tools_cli.flag_message(message) == (
        "--num-batches=5 but only 3 batches. Pass a smaller --num-batches; --to must be ..."
    )
    assert tools_cli.flag_message("go to sleep") == "go to sleep"
    assert len(tools_cli.flag_message("x" * 5000)) <= 400


def _statistics(model):
    return [w.numpy().copy() for w in model.weights if "moving" in w.path]


def test_non_finite_data_is_refused_and_nothing_is_written(saved_model, capsys):
    path, data, tmp = saved_model
    data = data.copy()
    data[6, 1] = np.inf
    data_path = os.path.join(tmp, "inf.npy")
    np.save(data_path, data)
    out = os.path.join(tmp, "out.keras")
    argv = ["recompute-statistics", path, out, "--data", data_path, "--batch-size", "4"]
    assert tools_cli.main(argv + ["--quiet"]) == 2
    line = _one_line_error(capsys)
    assert "Batch 1 (counting from 0)" in line and "NaN or infinite" in line
    assert not os.path.exists(out)


def test_fold_refuses_nan_statistics_naming_the_layer(saved_model, capsys):
    path, _, tmp = saved_model
    model = keras.models.load_model(path)
    model.get_layer("bn").moving_variance.assign([1.0, np.nan, 1.0, 1.0])
    model.save(path)
    out = os.path.join(tmp, "out.keras")
    assert tools_cli.main(["fold", path, out]) == 2
    line = _one_line_error(capsys)
    assert "'bn'" in line and "moving_variance" in line
    assert not os.path.exists(out)


def test_damaged_and_non_numeric_data_files_are_called_invalid(saved_model, capsys):
    path, _, tmp = saved_model
    out = os.path.join(tmp, "out.keras")
    damaged = os.path.join(tmp, "damaged.npz")
    with open(damaged, "wb") as handle:
        handle.write(b"PK\x03\x04 not really a zip archive")
    strings = os.path.join(tmp, "strings.npy")
    np.save(strings, np.array([["a"] * 5] * 3))
    folder = os.path.join(tmp, "folder.npy")
    os.mkdir(folder)
    expected = {damaged: "invalid", strings: "model inputs must be numbers", folder: "directory"}
    for data_path, words in expected.items():
        argv = ["recompute-statistics", path, out, "--data", data_path, "--quiet"]
        assert tools_cli.main(argv) == 2
        line = _one_line_error(capsys)
        assert words in line and data_path in line
        assert "not found" not in line.lower()


def test_multi_input_model_and_bad_output_are_refused_before_any_work(saved_model, capsys):
    _, _, tmp = saved_model
    first, second = keras.Input((5,)), keras.Input((5,))
    two_inputs = keras.Model([first, second], L.Add()([first, second]))
    two_path = os.path.join(tmp, "two.keras")
    two_inputs.save(two_path)
    data_path = os.path.join(tmp, "data.npy")
    argv = ["recompute-statistics", two_path, os.path.join(tmp, "o.keras"), "--data", data_path]
    assert tools_cli.main(argv) == 2
    assert "takes 2 inputs" in _one_line_error(capsys)
    for output, words in (("nowhere/o.keras", "does not exist"), ("o.txt", "must end in .keras")):
        argv = ["fold", two_path, os.path.join(tmp, output)]
        assert tools_cli.main(argv) == 2
        assert words in _one_line_error(capsys)


def test_unexpected_errors_are_one_line_unless_traceback_is_asked(saved_model, capsys, monkeypatch):
    path, _, tmp = saved_model

    def broken(*args, **kwargs):
        raise RuntimeError("internal failure\nsecond line")

    monkeypatch.setattr(tools_cli.folding, "fold_batch_norm", broken)
    out = os.path.join(tmp, "out.keras")
    assert tools_cli.main(["fold", path, out]) == 1
    line = _one_line_error(capsys)
    assert "RuntimeError: internal failure" in line and "--traceback" in line
    with pytest.raises(RuntimeError, match="internal failure"):
        tools_cli.main(["--traceback", "fold", path, out])


@pytest.mark.parametrize(
    "argv, words",
    [
        (["fold"], "the following arguments are required: model, output"),
        (["fold", "a.keras", "b.keras", "--bogus"], "unrecognized arguments: --bogus"),
        (["convert", "a.keras", "b.keras", "--to", "torch"], "invalid choice: 'torch'"),
        (["audit", "a.keras", "--batch-size", "many"], "invalid int value: 'many'"),
    ],
)
def test_command_line_mistakes_are_one_line_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tools_cli.main(argv)
    assert exit_info.value.code == 2
    line = _one_line_error(capsys)
    assert words in line and "--help" in line
