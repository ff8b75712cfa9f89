"""Tests for tfbn.finetune.distribution and the trainer under tf.distribute.

Multi-replica runs use the two logical CPU devices of `conftest.py` and its
session `two_cpu_strategy` (one MirroredStrategy per process); the
multi-worker run uses two `train.py` subprocesses on free localhost ports.
"""

import json
import os
import signal
import socket
import subprocess
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
import train_py
from trainer_test import DATA_DIR, MOMENTUM, REPO, loss_of, read_text, small_model, smoke_config

import tfbn
from tfbn.finetune import checkpoint as checkpoint_lib
from tfbn.finetune import distribution, train_step, trainer, update_plan

# Default vs two replicas: the same arithmetic in another order (sums of
# per-replica gradients and statistics), so float32 rounding differs.
ATOL, RTOL = 1e-6, 1e-5
PROCESS_TIMEOUT_S = 120


def replica_values(variable):
    """The value held on each replica of a (mirrored) variable."""
    return [np.array(component.numpy()) for component in variable.value.values]


def assert_replicas_identical(model):
    for variable in model.variables:
        first, *others = replica_values(variable)
        assert all(np.array_equal(first, other) for other in others), variable.path


# ------------------------------------------------------------------ helpers


def test_configure_logical_cpus_after_initialisation():
    count = len(tf.config.list_logical_devices("CPU"))  # initialises the devices
    distribution.configure_logical_cpus(count)  # the same split is accepted
    distribution.configure_logical_cpus(0)
    with pytest.raises(ValueError, match=f"already initialised its devices with {count}"):
        distribution.configure_logical_cpus(count + 1)
    with pytest.raises(ValueError, match="num_cpu_devices"):
        distribution.configure_logical_cpus(-1)


def test_make_strategy_default_and_errors(monkeypatch):
    assert distribution.make_strategy("default").num_replicas_in_sync == 1
    with pytest.raises(ValueError, match="`strategy` must be one of"):
        distribution.make_strategy("horovod")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG"):
        distribution.make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        distribution.make_strategy("multi_worker")
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}),
    )
    with pytest.raises(ValueError, match="'ps' is not in the cluster"):
        distribution.make_strategy("multi_worker")


@pytest.mark.parametrize(
    "task_type, task_id, cluster, chief",
    [
        (None, None, {}, True),
        ("chief", 0, {"chief": ["a"], "worker": ["b"]}, True),
        ("worker", 0, {"chief": ["a"], "worker": ["b"]}, False),
        ("worker", 0, {"worker": ["a", "b"]}, True),
        ("worker", 1, {"worker": ["a", "b"]}, False),
    ],
)
def test_chief_rule(task_type, task_id, cluster, chief):
    assert distribution.is_chief_task(task_type, task_id, cluster) is chief


def test_checkpoint_dir_of_chief_and_other_workers():
    assert distribution.WorkerRole(True, "worker", 0).checkpoint_dir("/runs/a") == "/runs/a"
    assert (
        distribution.WorkerRole(False, "worker", 1).checkpoint_dir("/runs/a")
        == "/runs/a/workertemp_worker_1"
    )
    assert distribution.worker_role(tf.distribute.get_strategy()).is_chief


def test_replica_batch_size(two_cpu_strategy):
    assert distribution.replica_batch_size(8, two_cpu_strategy) == 4
    with pytest.raises(ValueError, match="multiple of 2"):
        distribution.replica_batch_size(7, two_cpu_strategy)
    with pytest.raises(ValueError, match="at least 2 per replica"):
        distribution.replica_batch_size(2, two_cpu_strategy)


def test_synchronize_batch_norm_sets_every_bn_layer():
    model = small_model(head_bn=True)
    stock = small_model(keras.layers.BatchNormalization)
    assert distribution.synchronize_batch_norm(model) == 2
    assert distribution.synchronize_batch_norm(stock) == 1
    assert all(
        layer.synchronized
        for layer in update_plan.batch_norm_layers(model) + update_plan.batch_norm_layers(stock)
    )
    inputs = keras.Input((4,))
    virtual = keras.Model(inputs, tfbn.BatchNormalization(virtual_batch_size=2, name="vbn")(inputs))
    with pytest.raises(ValueError, match="vbn.*virtual_batch_size"):
        distribution.synchronize_batch_norm(virtual)


# ------------------------------------------------------- the replica step


def shifted_shards():
    """8 examples whose two replica shards come from different distributions."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(0.0, 1.0, (4, 6)), rng.normal(4.0, 2.0, (4, 6))]).astype(
        np.float32
    )
    return x, np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32)


def mirrored_step(strategy, bn_type, update_part=(), mode="inference", head_bn=False, sync=False):
    with strategy.scope():
        model = small_model(bn_type, head_bn=head_bn)
        if sync:
            distribution.synchronize_batch_norm(model)
        plan = update_plan.plan_update(model, update_part, frozen_bn_mode=mode)
        optimizer = keras.optimizers.SGD(0.1)
    step = train_step.build_train_step(model, optimizer, plan, strategy)
    skipped = step.skipped_steps

    def run(x, y):
        return step(*distribution.distribute_batch(strategy, tf.constant(x), tf.constant(y)))

    return model, run, skipped


@pytest.mark.parametrize("bn_type", [tfbn.BatchNormalization, keras.layers.BatchNormalization])
@pytest.mark.parametrize("sync", [False, True])
def test_replica_step_statistics_and_loss(two_cpu_strategy, bn_type, sync):
    model, run, _ = mirrored_step(two_cpu_strategy, bn_type, sync=sync)
    x, y = shifted_shards()
    bn = model.get_layer("bn1")
    h = (x @ model.get_layer("dense1").kernel.numpy()).astype(np.float64)
    if sync:
        # Global-batch statistics: single-device BN over all 8 examples.
        expected_loss = loss_of(model, x, y, training=True)
        batch_mean, batch_var = h.mean(0), h.var(0)
    else:
        # Local statistics: each replica normalizes its own shard; the
        # moving statistics take the mean of the two replicas' updates.
        expected_loss = (
            loss_of(model, x[:4], y[:4], True) + loss_of(model, x[4:], y[4:], True)
        ) / 2
        batch_mean = (h[:4].mean(0) + h[4:].mean(0)) / 2
        batch_var = (h[:4].var(0) + h[4:].var(0)) / 2
    bn.moving_mean.assign(np.zeros(4, np.float32))  # a stock layer updated itself in loss_of
    bn.moving_variance.assign(np.ones(4, np.float32))
    out = run(x, y)
    assert bool(out["applied"])
    np.testing.assert_allclose(float(out["loss"]), expected_loss, rtol=1e-5)
    for variable, expected in (
        (bn.moving_mean, (1 - MOMENTUM) * batch_mean),
        (bn.moving_variance, MOMENTUM + (1 - MOMENTUM) * batch_var),
    ):
        for value in replica_values(variable):
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
    assert_replicas_identical(model)


@pytest.mark.parametrize("bn_type", [tfbn.BatchNormalization, keras.layers.BatchNormalization])
def test_non_finite_on_one_replica_skips_on_all(two_cpu_strategy, bn_type):
    model, run, skipped = mirrored_step(
        two_cpu_strategy, bn_type, ("head/",), "adapt", head_bn=True
    )
    x, y = shifted_shards()
    before = [replica_values(v) for v in model.variables]
    bad = x.copy()
    bad[6, 0] = np.nan  # only the second replica's shard
    out = run(bad, y)
    assert not bool(out["applied"]) and int(skipped.numpy()) == 1
    for variable, old in zip(model.variables, before):
        assert all(np.array_equal(a, b) for a, b in zip(replica_values(variable), old)), (
            variable.path
        )
    assert bool(run(x, y)["applied"]) and int(skipped.numpy()) == 1
    assert not np.array_equal(replica_values(model.get_layer("bn2").moving_mean)[0], before[-6][0])
    assert_replicas_identical(model)


# ----------------------------------------------------------- trainer runs


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("default"))
    return model_dir, trainer.train(smoke_config(model_dir, "--train_steps=4", "--sync_bn"))


def test_mirrored_sync_bn_matches_default(default_run, two_cpu_strategy, tmp_path):
    _, single = default_run
    mirrored = trainer.train(
        smoke_config(str(tmp_path), "--train_steps=4", "--sync_bn", "--strategy=mirrored"),
        two_cpu_strategy,
    )
    assert mirrored.global_step == 4 and mirrored.skipped_steps == 0
    assert_replicas_identical(mirrored.model)
    for a, b in zip(single.model.variables, mirrored.model.variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=ATOL, rtol=RTOL, err_msg=a.path)
    # The chief wrote the run's files.
    assert {"bn_report.json", "metrics.jsonl", "flags.txt"} <= set(os.listdir(tmp_path))


def test_mirrored_partial_finetune_keeps_frozen_backbone_bit_identical(
    default_run, two_cpu_strategy, tmp_path
):
    pre_dir, _ = default_run
    saved = checkpoint_lib.read_model_variables(pre_dir)
    result = trainer.train(
        smoke_config(
            str(tmp_path),
            "--dataset=tfbn_shapes/target",
            f"--init_checkpoint={pre_dir}",
            "--restore_part=backbone/",
            "--update_part=head/",
            "--train_steps=3",
            "--strategy=mirrored",
            "--sync_bn",
        ),
        two_cpu_strategy,
    )
    for variable in result.model.variables:
        if variable.path.startswith("backbone/"):
            assert all(np.array_equal(v, saved[variable.path]) for v in replica_values(variable)), (
                variable.path
            )
    assert not np.array_equal(
        result.model.get_layer("fc_bn").moving_mean.numpy(), saved["head/fc_bn/moving_mean"]
    )
    assert json.loads(read_text(tmp_path / "bn_report.json"))["frozen_statistics_bit_identical"]
    assert_replicas_identical(result.model)


def free_port():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def start_workers(model_dir, ports, train_steps, log_dir):
    """Starts one `train.py --strategy=multi_worker` process per port; logs go to `log_dir`."""
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    processes = []
    for index in range(len(ports)):
        env = dict(
            os.environ,
            TF_CPP_MIN_LOG_LEVEL="2",
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        )
        command = train_py.command(
            f"--model_dir={model_dir}",
            f"--data_dir={DATA_DIR}",
            "--strategy=multi_worker",
            "--sync_bn",
            f"--train_steps={train_steps}",
            "--checkpoint_interval=2",
        )
        # Closed by the subprocess's exit; the test reads it afterwards.
        log = open(os.path.join(log_dir, f"worker{index}.log"), "ab")  # noqa: SIM115
        processes.append(
            subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        )
        log.close()
    return processes


def log_tail(log_dir):
    return "\n".join(
        open(os.path.join(log_dir, name), errors="replace").read()[-1500:]
        for name in sorted(os.listdir(log_dir))
    )


def stop(processes):
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()


def test_multi_worker_resumes_after_a_kill_and_matches_mirrored(two_cpu_strategy, tmp_path):
    model_dir = str(tmp_path / "multi_worker")
    ports = [free_port(), free_port()]
    log_dir = str(tmp_path / "logs")
    os.makedirs(log_dir)
    processes = start_workers(model_dir, ports, 100000, log_dir)
    try:
        deadline = time.time() + PROCESS_TIMEOUT_S
        while tf.train.latest_checkpoint(model_dir) is None and time.time() < deadline:
            assert all(p.poll() is None for p in processes), log_tail(log_dir)
            time.sleep(0.05)
        processes[1].send_signal(signal.SIGKILL)  # a worker dies; the job is restarted
    finally:
        stop(processes)
    latest = tf.train.latest_checkpoint(model_dir)
    assert latest is not None
    total = int(latest.rsplit("-", 1)[1]) + 2
    processes = start_workers(model_dir, ports, total, log_dir)
    try:
        deadline = time.time() + PROCESS_TIMEOUT_S
        for process in processes:
            process.wait(timeout=max(deadline - time.time(), 1))
            assert process.returncode == 0, log_tail(log_dir)
    finally:
        stop(processes)
    assert tf.train.latest_checkpoint(model_dir).endswith(f"-{total}")
    assert sorted(name for name in os.listdir(model_dir) if name.startswith("workertemp")) == []
    assert json.loads(read_text(os.path.join(model_dir, "bn_report.json")))[
        "frozen_statistics_bit_identical"
    ]
    mirrored = trainer.train(
        smoke_config(
            str(tmp_path / "mirrored"),
            f"--train_steps={total}",
            "--sync_bn",
            "--strategy=mirrored",
            "--checkpoint_interval=2",
        ),
        two_cpu_strategy,
    )
    saved = checkpoint_lib.read_model_variables(model_dir)
    for variable in mirrored.model.variables:
        np.testing.assert_allclose(
            saved[variable.path], variable.numpy(), atol=ATOL, rtol=RTOL, err_msg=variable.path
        )
