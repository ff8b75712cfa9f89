"""The quickstart example runs and shows what it claims."""

import importlib.util
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_example():
    spec = importlib.util.spec_from_file_location(
        "quickstart", os.path.join(REPO, "examples", "quickstart.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_tracks_the_data_and_filters_updates(capsys):
    quickstart = _load_example()
    quickstart.main()
    printed = capsys.readouterr().out
    assert "pending updates: ['input_bn', 'conv_bn']" in printed
    assert "input_bn unchanged" in printed
    images, _ = quickstart.make_data()
    # After 3 epochs with momentum 0.9 the input BN tracks the data closely.
    mean_line = next(
        line for line in printed.splitlines() if line.strip().startswith("moving_mean")
    )
    moving_mean = np.array(mean_line.split("[")[1].rstrip("]").split(), dtype=float)
    np.testing.assert_allclose(moving_mean, images.mean(axis=(0, 1, 2)), atol=0.1)
