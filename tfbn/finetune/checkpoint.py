"""The trainer's checkpoint: what it holds, and the exact resume of a run.

A trainer checkpoint is a `tf.train.Checkpoint` with

* `model_variables`: every model variable (moving statistics included),
  keyed by its Keras path (`backbone/conv1/kernel`);
* `optimizer_variables`: the optimizer's iteration count and slots, keyed
  by their Keras paths without the optimizer's name;
* `global_step`, `skipped_steps`: the rest of the run state (the global step
  is also the data position, see `tfbn.data.pipeline`).

Resume restores the whole object graph and insists that it matches.
`read_model_variables` reads the values by path without the object-graph
matcher (what the partial restore, `tfbn.finetune.partial_restore`, uses).
Which checkpoint a directory holds, and whether its files are intact, is
decided by `tfbn.finetune.checkpoint_files`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from tfbn.finetune import checkpoint_files
from tfbn.layers import introspection

MODEL_VARIABLES = "model_variables"
OPTIMIZER_VARIABLES = "optimizer_variables"
# The key of an object-based checkpoint's object graph; a TF1 `Saver` checkpoint has none.
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def make_checkpoint(model, optimizer, global_step, skipped_steps) -> tf.train.Checkpoint:
    """The trainer's checkpoint object for `model` and its run state.

    Args:
        model: A built Keras model; all its variables are saved by path.
        optimizer: The Keras optimizer (built, so its slots exist).
        global_step: int64 `tf.Variable`, the number of steps taken.
        skipped_steps: int64 `tf.Variable`, steps skipped as non-finite.

    Returns:
        The `tf.train.Checkpoint`.

    Raises:
        ValueError: If several model (or optimizer) variables share a path.
    """
    entries = {
        # Nested layer paths: the same for the model a run builds and the
        # model loaded back from its `.keras` export (see introspection).
        MODEL_VARIABLES: {
            path: variable.value
            for path, variable in introspection.nested_variable_paths(model).items()
        },
        # Without the optimizer's own name: Keras numbers it per process
        # ("sgd", "sgd_1", ...), which must not break a resume.
        OPTIMIZER_VARIABLES: {
            variable.path.split("/", 1)[-1]: variable.value for variable in optimizer.variables
        },
    }
    for name, variables in (
        (MODEL_VARIABLES, model.variables),
        (OPTIMIZER_VARIABLES, optimizer.variables),
    ):
        if len(entries[name]) != len(variables):
            raise ValueError(
                f"{name}: several variables share a path; give the model's layers "
                "unique names so variables can be matched by path."
            )
    return tf.train.Checkpoint(**entries, global_step=global_step, skipped_steps=skipped_steps)


def read_model_variables(
    path: str, entry: str = MODEL_VARIABLES, argument: str | None = "init_checkpoint"
) -> dict[str, np.ndarray]:
    """Reads the model (or optimizer) variables of a trainer checkpoint by path.

    Args:
        path: A checkpoint prefix or a directory holding checkpoints.
        entry: `MODEL_VARIABLES` or `OPTIMIZER_VARIABLES`.
        argument: The argument `path` came from, named in errors (see
            `checkpoint_files.resolve_checkpoint_path`).

    Returns:
        `{variable_path: value}`.

    Raises:
        ValueError: If the checkpoint was not written by the tfbn trainer
            (a TF1 `Saver` checkpoint, another object graph) or a file of
            it is unreadable; the message names the file.
    """
    prefix = checkpoint_files.resolve_checkpoint_path(path, argument)
    try:
        reader = tf.train.load_checkpoint(prefix)
    except checkpoint_files.READ_ERRORS as error:
        problem = checkpoint_files.checkpoint_problem(prefix, read_values=False)
        problem = problem or checkpoint_files.first_line(error)
        raise ValueError(f"Checkpoint {prefix} cannot be read: {problem}.") from None
    if not reader.has_tensor(OBJECT_GRAPH_KEY):
        names = sorted(reader.get_variable_to_shape_map())
        raise ValueError(
            f"Checkpoint {prefix} is a name-based checkpoint (TF1 "
            "`tf.compat.v1.train.Saver` or `tf.compat.v1.train.Checkpoint` style, no "
            "object graph), not one written by the tfbn trainer; its variables are "
            f"named {names[:5]}{' ...' if len(names) > 5 else ''}. Load those values "
            "into the model by name (`tf.train.load_checkpoint(prefix).get_tensor(name)`), "
            "save it with the tfbn trainer, and pass that checkpoint instead."
        )
    try:
        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        graph.ParseFromString(reader.get_tensor(OBJECT_GRAPH_KEY))
        root = graph.nodes[0]
        node_ids = [child.node_id for child in root.children if child.local_name == entry]
        if not node_ids:
            raise ValueError(
                f"Checkpoint {prefix!r} has no {entry!r} entry, so it was not "
                "written by the tfbn trainer; its top-level objects are "
                f"{[child.local_name for child in root.children]}."
            )
        values = {}
        for child in graph.nodes[node_ids[0]].children:
            attributes = graph.nodes[child.node_id].attributes
            values[child.local_name] = reader.get_tensor(attributes[0].checkpoint_key)
    except (tf.errors.OpError, IndexError) as error:
        problem = checkpoint_files.checkpoint_problem(prefix) or checkpoint_files.first_line(error)
        raise ValueError(f"Checkpoint {prefix} cannot be read: {problem}.") from None
    return values


def resume(
    checkpoint: tf.train.Checkpoint, source: str | tf.train.CheckpointManager | None
) -> str | None:
    """Restores a checkpoint of the run's own `model_dir`, matching exactly.

    Args:
        checkpoint: The run's checkpoint (`make_checkpoint`).
        source: The checkpoint prefix to restore
            (`checkpoint_files.find_checkpoints(...).latest`), a
            `tf.train.CheckpointManager` (its latest checkpoint), or None.

    Returns:
        The checkpoint prefix restored, or None when there is none.

    Raises:
        ValueError: If the checkpoint does not match this run's model and
            optimizer (for example it was written with another update set or
            another optimizer), or a file of it is unreadable; nothing is
            restored then.
    """
    latest = source.latest_checkpoint if isinstance(source, tf.train.CheckpointManager) else source
    if latest is None:
        return None
    hint = (
        "Resume with the flags it was written with (see flags.txt next to it), or "
        "start a new `model_dir` and pass the old one as `init_checkpoint`."
    )
    # Compare paths and shapes first: a mismatch is then reported before the
    # object-graph restore starts (which would leave half-restored state).
    for entry in (MODEL_VARIABLES, OPTIMIZER_VARIABLES):
        saved = read_model_variables(latest, entry, argument=None)
        current = {path: tuple(value.shape) for path, value in getattr(checkpoint, entry).items()}
        differences = sorted(
            path
            for path in set(saved) | set(current)
            if path not in saved or path not in current or saved[path].shape != current[path]
        )
        if differences:
            raise ValueError(
                f"{latest} does not match this run: {entry} differ in presence or "
                f"shape: {differences[:10]}. {hint}"
            )
    status = checkpoint.restore(latest)
    try:
        status.assert_consumed()
    except AssertionError as error:
        status.expect_partial()
        raise ValueError(f"{latest} does not match this run: {str(error)[:300]}. {hint}") from None
    return latest
