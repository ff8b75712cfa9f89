"""`tf.distribute` for the trainer: logical CPUs, the strategy, the chief, sync BN.

The trainer runs one code path under every strategy (the default strategy
is just a one-replica case of it); this module builds the pieces around it:

* `configure_logical_cpus` splits the CPU into N logical devices, which is
  how multi-replica training is run and tested on a CPU-only machine. It
  must run before TensorFlow initialises its devices.
* `make_strategy` builds the strategy named by the `strategy` config field.
* `WorkerRole` tells a worker whether it is the chief (which writes the
  checkpoints, summaries, metrics, BN report and export) and where a
  non-chief worker writes its throw-away checkpoints.
* `synchronize_batch_norm` makes every BN layer compute global-batch
  statistics across replicas (`sync_bn`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow as tf
from absl import logging

from tfbn.finetune import update_plan
from tfbn.finetune.config import STRATEGIES


def configure_logical_cpus(num_devices: int) -> None:
    """Splits the first physical CPU into `num_devices` logical devices.

    Args:
        num_devices: The number of logical CPU devices; 0 leaves the device
            setup as it is.

    Raises:
        ValueError: If `num_devices` is negative, or TensorFlow already
            initialised its devices with a different number of logical CPUs
            (the split is only possible before the first TensorFlow op).
    """
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 0:
        raise ValueError(
            f"`num_cpu_devices` must be an integer >= 0 (0 keeps the device setup); "
            f"received {num_devices!r}."
        )
    if num_devices == 0:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices
        )
    except RuntimeError:
        # Devices are initialised already; that is fine when they match.
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing != num_devices:
            raise ValueError(
                f"`num_cpu_devices`={num_devices}: TensorFlow already initialised its "
                f"devices with {existing} logical CPU device(s), and they cannot be "
                "split afterwards. Configure them before any TensorFlow op runs (train.py "
                "does so first thing), or pass `num_cpu_devices`="
                f"{existing}."
            ) from None


def make_strategy(name: str) -> tf.distribute.Strategy:
    """Builds the strategy that the `strategy` config field names.

    * `default`: no distribution (one replica on the default device).
    * `mirrored`: one worker, one replica per GPU; without GPUs, one replica
      per logical CPU device (see `configure_logical_cpus`).
    * `multi_worker`: `MultiWorkerMirroredStrategy`; the cluster and this
      worker's role come from the `TF_CONFIG` environment variable. Create
      it before other TensorFlow ops run (collective ops are configured at
      startup).
    * `tpu`: `TPUStrategy` on the TPU the `TPU_NAME` environment variable (or
      the local runtime) names. Untested: no TPU was available to the
      project; it is built, with a warning, so TPU users can try it.

    Args:
        name: One of `STRATEGIES`.

    Returns:
        The strategy.

    Raises:
        ValueError: For an unknown name, or `multi_worker` without a usable
            `TF_CONFIG`.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        devices = [device.name for device in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        cluster_spec, task = _cluster_from_tf_config()
        logging.info("multi_worker: task %s of cluster %s", task, cluster_spec)
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        logging.warning(
            "`strategy`='tpu' is untested (no TPU was available to the tfbn project); "
            "report problems with the full log."
        )
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=os.environ.get("TPU_NAME", "")
        )
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"`strategy` must be one of {list(STRATEGIES)}; received {name!r}.")


def _cluster_from_tf_config():
    """The `cluster` and `task` of `TF_CONFIG`, checked for what `multi_worker` needs."""
    example = (
        'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
        '"task": {"type": "worker", "index": 0}}\''
    )
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ValueError(
            f"`strategy`='multi_worker' needs the TF_CONFIG environment variable, e.g. {example}."
        )
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"TF_CONFIG is not valid JSON ({error}); received {raw!r}; e.g. {example}."
        ) from None
    cluster, task = tf_config.get("cluster"), tf_config.get("task")
    if (
        not isinstance(cluster, dict)
        or not cluster
        or not isinstance(task, dict)
        or "type" not in task
    ):
        raise ValueError(
            "TF_CONFIG needs a 'cluster' and a 'task' with 'type' and 'index'; "
            f"received {raw!r}; e.g. {example}."
        )
    if task["type"] not in cluster:
        raise ValueError(
            f"TF_CONFIG task type {task['type']!r} is not in the cluster {sorted(cluster)}."
        )
    return cluster, task


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """What this worker writes.

    Attributes:
        is_chief: Whether this worker writes the run's checkpoints,
            summaries, metrics.jsonl, flags.txt, BN report and export.
        task_type: `"chief"`, `"worker"`, or None without a cluster.
        task_id: The task index, or None without a cluster.
    """

    is_chief: bool
    task_type: str | None = None
    task_id: int | None = None

    def checkpoint_dir(self, model_dir: str) -> str:
        """Where this worker saves checkpoints.

        Every worker takes part in a save (as `tf.distribute` requires), but
        only the chief's lands in `model_dir`; the others write to their own
        `workertemp_<type>_<id>` directory, which the trainer deletes after
        each save.

        Args:
            model_dir: The run's directory.

        Returns:
            The directory this worker saves to.
        """
        if self.is_chief:
            return model_dir
        return os.path.join(model_dir, f"workertemp_{self.task_type}_{self.task_id}")


def is_chief_task(task_type: str | None, task_id: int | None, cluster: dict) -> bool:
    """TensorFlow's chief rule: the `chief` task, else worker 0 of a cluster without one.

    Args:
        task_type: This task's type (`"chief"`, `"worker"`, ...), or None
            without a cluster.
        task_id: This task's index.
        cluster: The cluster spec as `{task_type: [addresses]}`.

    Returns:
        Whether the task is the chief.
    """
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


def worker_role(strategy: tf.distribute.Strategy) -> WorkerRole:
    """The `WorkerRole` of this process under `strategy`.

    Args:
        strategy: The run's strategy.

    Returns:
        The role; every strategy but `MultiWorkerMirroredStrategy` makes this
        process the chief.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return WorkerRole(is_chief=True)
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    chief = is_chief_task(task_type, task_id, resolver.cluster_spec().as_dict())
    return WorkerRole(chief, task_type, None if task_id is None else int(task_id))


def synchronize_batch_norm(model) -> int:
    """Makes every BN layer of `model` use global-batch statistics across replicas.

    tfbn and stock Keras BN layers both read `synchronized` at call time, so
    setting it on a built model takes effect at the next traced call. Under
    a single replica it changes nothing but the code path.

    Args:
        model: A built Keras model.

    Returns:
        The number of BN layers changed.

    Raises:
        ValueError: If a layer uses `virtual_batch_size`, which splits the
            local batch and so contradicts global statistics.
    """
    layers = update_plan.batch_norm_layers(model)
    for layer in layers:
        if getattr(layer, "virtual_batch_size", None) is not None:
            raise ValueError(
                f"`sync_bn`: layer {layer.path!r} uses virtual_batch_size="
                f"{layer.virtual_batch_size}, which contradicts global-batch statistics; "
                "drop `sync_bn` or the virtual batch size."
            )
    for layer in layers:
        layer.synchronized = True
    return len(layers)


def replica_batch_size(global_batch_size: int, strategy: tf.distribute.Strategy) -> int:
    """The per-replica batch of an evenly split global batch.

    Args:
        global_batch_size: The `batch_size` of the run (the global batch).
        strategy: The run's strategy.

    Returns:
        The examples per replica.

    Raises:
        ValueError: If the global batch does not split evenly, or leaves a
            replica fewer than 2 examples (local BN statistics need two).
    """
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise ValueError(
            f"`batch_size`={global_batch_size} is the global batch and must split evenly "
            f"over the {replicas} replicas; use a multiple of {replicas}."
        )
    if global_batch_size // replicas < 2:
        raise ValueError(
            f"`batch_size`={global_batch_size} leaves {global_batch_size // replicas} "
            f"example(s) per replica over {replicas} replicas; BN needs at least 2 per "
            "replica."
        )
    return global_batch_size // replicas


def distribute_batch(strategy: tf.distribute.Strategy, images, labels):
    """Splits one global batch into per-replica slices, one per replica in sync.

    Every worker computes the same global batch of a step (it is a pure
    function of the seed and the step), and each replica takes the slice of
    its global replica id, so the split is deterministic and resumes exactly.

    Args:
        strategy: The run's strategy.
        images: The global batch of images.
        labels: The global batch of labels.

    Returns:
        `(images, labels)` as distributed values for `strategy.run`.
    """
    per_replica = replica_batch_size(int(images.shape[0]), strategy)

    def slice_for(context):
        start = context.replica_id_in_sync_group * per_replica
        return images[start : start + per_replica], labels[start : start + per_replica]

    return strategy.experimental_distribute_values_from_function(slice_for)


def local_batch_rows(strategy: tf.distribute.Strategy, batch_size: int) -> tuple[int, int] | None:
    """The rows of each global batch that this worker's replicas train on.

    `distribution.distribute_batch` gives replica `r` rows
    `[r * per_replica, (r + 1) * per_replica)`; a multi-worker worker holds
    consecutive replicas, so it reads only their rows (its shard) and
    never decodes the other workers' images.

    Args:
        strategy: The run's strategy.
        batch_size: The global batch.

    Returns:
        `(begin, end)`, or None when this process holds every replica.
    """
    ids = strategy.experimental_local_results(
        strategy.experimental_distribute_values_from_function(
            lambda context: context.replica_id_in_sync_group
        )
    )
    ids = sorted(int(replica) for replica in ids)
    if len(ids) == strategy.num_replicas_in_sync or ids != list(range(ids[0], ids[-1] + 1)):
        return None
    per_replica = batch_size // strategy.num_replicas_in_sync
    return ids[0] * per_replica, (ids[-1] + 1) * per_replica
