"""Test-session setup shared by every test module.

Two logical CPU devices are configured before TensorFlow initialises its
devices, so multi-replica behaviour (MirroredStrategy, synchronized BN) is
tested on a CPU-only machine.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 2

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def two_cpu_strategy():
    """One MirroredStrategy over the two logical CPUs for the whole session.

    TensorFlow numbers collective instances per strategy from the same start,
    and its collective executor caches them per process: a second strategy
    in the same process can hit the first one's cached shapes. Sharing one
    strategy avoids that.
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(scope="session")
def tfds_data_dir():
    """TFDS directory shared by the tests; the embedded dataset is generated once."""
    import tempfile

    return os.path.join(tempfile.gettempdir(), "tfbn_test_data")
