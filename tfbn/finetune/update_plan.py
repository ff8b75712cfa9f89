"""Scope patterns: which variables train, which BN layers update, and how.

Patterns are regexes `re.match`-ed against Keras variable paths
(`backbone/conv1/kernel`), TF1's scope-prefix semantics. Every pattern must
match at least one path: a typo is an error that lists the known prefixes,
never a silent no-op that freezes or trains the wrong part.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import keras

from tfbn.layers import introspection

# The BN layer types the trainer knows how to freeze and update.

MODE_TRAIN = "train"


def known_prefixes(paths: Sequence[str], depth: int = 2) -> list[str]:
    """The distinct path prefixes up to `depth` components, for error messages."""
    prefixes = set()
    for path in paths:
        parts = path.split("/")
        for size in range(1, min(depth, len(parts) - 1) + 1):
            prefixes.add("/".join(parts[:size]) + "/")
    return sorted(prefixes) or sorted(paths)


def matching(paths: Sequence[str], patterns: Sequence[str], flag_name: str) -> list[str]:
    """The paths that `re.match` at least one pattern, in their original order.

    Args:
        paths: Candidate paths.
        patterns: Regexes; each must match at least one path.
        flag_name: The flag the patterns came from, named in errors.

    Returns:
        The matching paths.

    Raises:
        ValueError: If a pattern matches no path; the message lists the known
            prefixes so the typo is easy to fix.
    """
    for pattern in patterns:
        if not any(re.match(pattern, path) for path in paths):
            raise ValueError(
                f"--{flag_name} pattern {pattern!r} matches no variable. Patterns are "
                "re.match-ed against the start of Keras variable paths; known "
                f"prefixes: {known_prefixes(paths)}. Fix the pattern or drop it."
            )
    return [path for path in paths if any(re.match(p, path) for p in patterns)]


def select(
    paths: Sequence[str],
    include: Sequence[str],
    exclude: Sequence[str],
    include_flag: str,
    exclude_flag: str,
) -> list[str]:
    """`include` (all paths when empty) minus `exclude`, both strictly matched."""
    chosen = set(matching(paths, include, include_flag)) if include else set(paths)
    dropped = set(matching(paths, exclude, exclude_flag))
    return [path for path in paths if path in chosen and path not in dropped]


def batch_norm_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every built BN layer (tfbn or stock Keras) in `model`, nested ones included."""
    return [layer for layer in introspection.batch_norm_layers(model) if layer.built]


@dataclasses.dataclass(frozen=True)
class UpdatePlan:
    """What one fine-tune run trains, and the mode of every BN layer.

    Attributes:
        update_variables: Trainable variables that receive gradients.
        frozen_variables: Every model variable that must stay bit-identical:
            all but the update set and the statistics of BN layers in
            `"train"` or `"adapt"` mode.
        bn_modes: `(layer, mode)` per BN layer, mode being `"train"` for
            layers in the update set, else the `--frozen_bn_mode`.
    """

    update_variables: tuple[object, ...]
    frozen_variables: tuple[object, ...]
    bn_modes: tuple[tuple[object, str], ...]


def plan_update(
    model: keras.Model,
    update_part: Sequence[str] = (),
    freeze_part: Sequence[str] = (),
    freeze_batchnorm: bool = False,
    frozen_bn_mode: str = "inference",
) -> UpdatePlan:
    """Splits `model` into the update set and the frozen rest.

    A BN layer is in the update set when its `moving_mean` is selected (so
    `--update_part=head/` covers every BN under `head/`) and the layer is
    trainable; `freeze_batchnorm` takes every BN layer out. A BN layer the
    model already built with `trainable=False` stays in inference mode.

    Args:
        model: A built Keras model.
        update_part: Regexes of variables to train; empty means all.
        freeze_part: Regexes of variables to keep frozen (wins over
            `update_part`).
        freeze_batchnorm: Freeze every BN layer's gamma, beta and statistics.
        frozen_bn_mode: `"inference"`, `"batch"` or `"adapt"`, the mode of BN
            layers outside the update set.

    Returns:
        The `UpdatePlan`.

    Raises:
        ValueError: If a pattern matches nothing, or nothing is left to train.
    """
    variables = list(model.variables)
    if not variables:
        raise ValueError(
            f"Model {model.name!r} has no variables; build it (call it once) before "
            "planning the update set."
        )
    by_path = {variable.path: variable for variable in variables}
    selected = set(select(list(by_path), update_part, freeze_part, "update_part", "freeze_part"))
    bn_layers = batch_norm_layers(model)
    if freeze_batchnorm:
        for layer in bn_layers:
            selected -= {variable.path for variable in layer.variables}
    bn_modes = []
    for layer in bn_layers:
        if not layer.trainable:
            # Frozen by the model itself: Keras' rule, inference mode.
            bn_modes.append((layer, "inference"))
        elif layer.moving_mean.path in selected:
            bn_modes.append((layer, MODE_TRAIN))
        else:
            bn_modes.append((layer, frozen_bn_mode))
    update_variables = tuple(
        variable for variable in model.trainable_variables if variable.path in selected
    )
    if not update_variables:
        raise ValueError(
            "The update set is empty: --update_part / --freeze_part / "
            f"--freeze_batchnorm leave no trainable variable (update_part="
            f"{list(update_part)}, freeze_part={list(freeze_part)}). Known prefixes: "
            f"{known_prefixes(list(by_path))}."
        )
    moving = {
        id(variable)
        for layer, mode in bn_modes
        if mode in (MODE_TRAIN, "adapt")
        for variable in layer.non_trainable_variables
    }
    changing = moving | {id(variable) for variable in update_variables}
    frozen = tuple(variable for variable in variables if id(variable) not in changing)
    return UpdatePlan(update_variables, frozen, tuple(bn_modes))
