"""Trainer checkpoints: exact resume, and partial restore keyed by variable path.

A trainer checkpoint is a `tf.train.Checkpoint` with

* `model_variables`: every model variable (moving statistics included),
  keyed by its Keras path (`backbone/conv1/kernel`);
* `optimizer_variables`: the optimizer's iteration count and slots, keyed
  by their Keras paths without the optimizer's name;
* `global_step`, `skipped_steps`: the rest of the run state (the global step
  is also the data position, see `tfbn.data.pipeline`).

Resume restores the whole object graph and insists that it matches. Partial
restore (`restore_partial`) does not use the object-graph matcher at all: it
reads the values by path with `tf.train.load_checkpoint` and assigns the
selected ones, so there is no deferred restoration, no "Unresolved object"
warning at exit, and a report of what was restored, skipped and missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from tfbn.finetune import patterns

MODEL_VARIABLES = "model_variables"
OPTIMIZER_VARIABLES = "optimizer_variables"
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


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
        MODEL_VARIABLES: {variable.path: variable.value for variable in model.variables},
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


def resolve_checkpoint_path(path: str) -> str:
    """A checkpoint prefix from a model_dir (its latest checkpoint) or a prefix.

    Args:
        path: A directory holding checkpoints, or a checkpoint prefix.

    Returns:
        The checkpoint prefix.

    Raises:
        ValueError: If `path` holds no checkpoint.
    """
    if tf.io.gfile.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise ValueError(
                f"`init_checkpoint` {path!r} is a directory without a checkpoint; "
                "pass a model_dir of a finished run or a checkpoint prefix."
            )
        return latest
    if not tf.io.gfile.exists(path + ".index"):
        raise ValueError(
            f"`init_checkpoint` {path!r} is neither a directory nor a checkpoint prefix "
            f"({path}.index does not exist)."
        )
    return path


def read_model_variables(path: str, entry: str = MODEL_VARIABLES) -> dict[str, np.ndarray]:
    """Reads the model (or optimizer) variables of a trainer checkpoint by path.

    Args:
        path: A checkpoint prefix or a directory holding checkpoints.
        entry: `MODEL_VARIABLES` or `OPTIMIZER_VARIABLES`.

    Returns:
        `{variable_path: value}`.

    Raises:
        ValueError: If the checkpoint was not written by the tfbn trainer.
    """
    prefix = resolve_checkpoint_path(path)
    reader = tf.train.load_checkpoint(prefix)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(_OBJECT_GRAPH_KEY))
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
    return values


@dataclasses.dataclass(frozen=True)
class RestoreReport:
    """The outcome of a partial restore.

    Attributes:
        checkpoint: The checkpoint prefix read.
        restored: Model variable paths assigned from the checkpoint.
        skipped: Checkpoint variable paths not restored (not selected or
            excluded, or absent from the model).
        not_restored: Model variable paths left at their initial value.
    """

    checkpoint: str
    restored: list[str]
    skipped: list[str]
    not_restored: list[str]

    def summary(self) -> str:
        """A few human-readable lines.

        Returns:
            The summary text.
        """
        return (
            f"Restored {len(self.restored)} variables from {self.checkpoint}; "
            f"skipped {len(self.skipped)} checkpoint variables; "
            f"{len(self.not_restored)} model variables keep their initial value."
        )


def plan_restore(
    model_paths: Sequence[str],
    checkpoint_values: dict[str, np.ndarray],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[str]:
    """The model variable paths to restore; every one must be in the checkpoint.

    Args:
        model_paths: The model's variable paths.
        checkpoint_values: `{path: value}` of the checkpoint.
        include: Regexes of the paths to restore (`restore_part`); empty
            means all.
        exclude: Regexes of the paths not to restore (`restore_exclude`).

    Returns:
        The selected model paths, in model order.

    Raises:
        ValueError: If a pattern matches no model variable, or a selected
            variable is missing from the checkpoint.
    """
    selected = patterns.select(model_paths, include, exclude, "restore_part", "restore_exclude")
    missing = [path for path in selected if path not in checkpoint_values]
    if missing:
        raise ValueError(
            f"{len(missing)} selected variables are missing from the checkpoint: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}. Exclude them with "
            "`restore_exclude` (e.g. a new head) or narrow `restore_part`. "
            f"Checkpoint prefixes: {patterns.known_prefixes(list(checkpoint_values))}."
        )
    return selected


def restore_partial(
    model,
    checkpoint: str,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    sample_input=None,
) -> RestoreReport:
    """Restores the selected model variables (moving statistics included).

    Works on a model that was never called: a functional model owns its
    variables from construction; a subclassed model is built first by calling
    it on `sample_input` in inference mode (which changes no variable).

    Args:
        model: The Keras model to restore into.
        checkpoint: A trainer checkpoint prefix or a directory holding one.
        include: Regexes of variable paths to restore; empty means all.
        exclude: Regexes of variable paths not to restore.
        sample_input: An input batch used to build an unbuilt model.

    Returns:
        The `RestoreReport`.

    Raises:
        ValueError: If the model has no variables and no `sample_input`, a
            pattern matches nothing, a selected variable is missing from the
            checkpoint, or a shape differs.
    """
    if not model.variables:
        if sample_input is None:
            raise ValueError(
                f"Model {model.name!r} has no variables yet; pass `sample_input` "
                "(one input batch) so it can be built before the restore."
            )
        model(sample_input, training=False)
    prefix = resolve_checkpoint_path(checkpoint)
    values = read_model_variables(prefix)
    by_path = {variable.path: variable for variable in model.variables}
    selected = plan_restore(list(by_path), values, include, exclude)
    for path in selected:
        variable, value = by_path[path], values[path]
        if tuple(variable.shape) != value.shape:
            raise ValueError(
                f"Variable {path!r} has shape {tuple(variable.shape)} in the model but "
                f"{value.shape} in {prefix}; exclude it with `restore_exclude`."
            )
        variable.assign(value)
    chosen = set(selected)
    return RestoreReport(
        checkpoint=prefix,
        restored=selected,
        skipped=sorted(path for path in values if path not in chosen),
        not_restored=[path for path in by_path if path not in chosen],
    )


def resume(checkpoint: tf.train.Checkpoint, manager: tf.train.CheckpointManager) -> str | None:
    """Restores the latest checkpoint of `manager`, if any, matching exactly.

    Args:
        checkpoint: The run's checkpoint (`make_checkpoint`).
        manager: The manager of the run's `model_dir`.

    Returns:
        The checkpoint prefix restored, or None when the directory has none.

    Raises:
        ValueError: If the checkpoint does not match this run's model and
            optimizer (for example it was written with another update set or
            another optimizer); nothing is restored then.
    """
    latest = manager.latest_checkpoint
    if latest is None:
        return None
    hint = (
        "Resume with the flags it was written with (see flags.txt next to it), or "
        "start a new `model_dir` and pass the old one as `init_checkpoint`."
    )
    # Compare paths and shapes first: a mismatch is then reported before the
    # object-graph restore starts (which would leave half-restored state).
    for entry in (MODEL_VARIABLES, OPTIMIZER_VARIABLES):
        saved = read_model_variables(latest, entry)
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
