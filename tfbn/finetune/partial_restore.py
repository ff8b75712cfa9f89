"""Partial restore: selected model variables assigned by nested path from a restore source.

The partial restore (`restore_partial`) does not use the object-graph
matcher at all: it reads the source's values by path (a trainer checkpoint
with `tfbn.finetune.checkpoint.read_model_variables`, other formats with
`tfbn.finetune.weight_sources`) and assigns the selected ones, so there is no
deferred restoration, no "Unresolved object" warning at exit, and a report of
what was restored, skipped and missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tfbn.finetune import checkpoint, checkpoint_files, patterns, weight_sources
from tfbn.layers import introspection


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
        """One human-readable line: how many variables were restored, skipped and kept.

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


def read_restore_source(source: str, model=None) -> tuple[str, dict[str, np.ndarray]]:
    """The weights an `init_checkpoint` holds, by nested layer path.

    Args:
        source: A trainer checkpoint (prefix or model_dir), a TF1 `Saver`
            checkpoint prefix, a `.keras` file or a `.weights.h5` file (see
            `weight_sources`).
        model: The model being restored (the architecture that reads a
            `.weights.h5` file).

    Returns:
        `(what was read, {path: value})`: the checkpoint prefix or the file.

    Raises:
        ValueError: If the source is missing or unreadable.
    """
    if weight_sources.is_weights_file(source):
        return source, weight_sources.read_weights_file(source, model)
    prefix = checkpoint_files.resolve_checkpoint_path(source)
    try:
        tf1 = weight_sources.is_tf1_checkpoint(prefix)
    except checkpoint_files.READ_ERRORS:
        tf1 = False  # read_model_variables names the unreadable file.
    if tf1:
        return prefix, weight_sources.read_tf1_checkpoint(prefix)
    return prefix, checkpoint.read_model_variables(prefix)


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
        checkpoint: A trainer checkpoint prefix or a directory holding one,
            a TF1 `Saver` checkpoint prefix, a `.keras` or a `.weights.h5` file
            (`read_restore_source`); weights are matched by nested layer path.
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
    prefix, values = read_restore_source(checkpoint, model)
    by_path = introspection.nested_variable_paths(model)
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
