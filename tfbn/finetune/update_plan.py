"""The update plan: which variables train, and the mode of every BN layer.

`plan_update` splits a built model into the update set (variables that
receive gradients) and the frozen rest, using the scope patterns of
`tfbn.finetune.patterns`, and gives every BN layer a `BNMode`. The train
step (`tfbn.finetune.train_step`) and `tfbn.partial_finetune` (for
`model.fit`) carry the plan out.

Patterns match nested layer paths (`backbone/bn1/gamma`: sub-model, layer,
weight; `introspection.nested_variable_paths`), which are the same in a
built model and in the model loaded back from its `.keras` file, unlike
`variable.path` (which keeps the name scopes of the build only).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Sequence

import keras

from tfbn.finetune import config, patterns
from tfbn.layers import introspection


class BNMode(str, enum.Enum):
    """What a BN layer does during a train step.

    The values are the strings of the `frozen_bn_mode` config field (and
    flag), plus `"train"` for layers in the update set.

    Attributes:
        TRAIN: In the update set: batch statistics, gradients for gamma and
            beta, moving statistics updated.
        INFERENCE: Moving statistics, no update; the statistics stay
            bit-identical (the layer runs with `trainable=False`).
        BATCH: Batch statistics, update discarded (TF1 with scope-filtered
            UPDATE_OPS); the statistics stay bit-identical.
        ADAPT: Batch statistics and update applied (TF1's global UPDATE_OPS,
            AdaBN).
    """

    TRAIN = "train"
    INFERENCE = "inference"
    BATCH = "batch"
    ADAPT = "adapt"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def updates_statistics(self) -> bool:
        """Whether a layer in this mode has its moving statistics updated.

        Returns:
            True for `TRAIN` and `ADAPT`.
        """
        return self in (BNMode.TRAIN, BNMode.ADAPT)

    @property
    def uses_batch_statistics(self) -> bool:
        """Whether a layer in this mode normalizes with batch statistics.

        Returns:
            False for `INFERENCE` only.
        """
        return self is not BNMode.INFERENCE


# The `frozen_bn_mode` choices, as the config (and the flag) spell them.
FROZEN_BN_MODES = tuple(BNMode(value) for value in config.FROZEN_BN_MODES)


def batch_norm_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every built BN layer (tfbn or stock Keras) in `model`, nested ones included.

    Args:
        model: A Keras model.

    Returns:
        The layers, depth first in layer order (`backbone/bn1` before
        `backbone/bn2`; Keras' own flattening reverses nested layers).
    """
    order = {key: index for index, key in enumerate(introspection.nested_layer_paths(model))}
    layers = [layer for layer in introspection.batch_norm_layers(model) if layer.built]
    return sorted(layers, key=lambda layer: order.get(id(layer), len(order)))


@dataclasses.dataclass(frozen=True)
class UpdatePlan:
    """What one fine-tune run trains, and the mode of every BN layer.

    Attributes:
        update_variables: Trainable variables that receive gradients.
        frozen_variables: Every model variable that must stay bit-identical:
            all but the update set and the statistics of BN layers whose
            mode updates them (`TRAIN`, `ADAPT`).
        bn_modes: `(layer, BNMode)` per BN layer: `TRAIN` for layers in the
            update set, else the frozen mode.
    """

    update_variables: tuple[object, ...]
    frozen_variables: tuple[object, ...]
    bn_modes: tuple[tuple[object, BNMode], ...]
    paths: dict[int, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def path(self, item) -> str:
        """The nested path that patterns matched for a variable or layer of the plan.

        Args:
            item: A variable or a BN layer of the model.

        Returns:
            Its nested path (`backbone/bn1/gamma`, `backbone/bn1`); its Keras
            `path` when the plan does not know it.
        """
        return self.paths.get(id(item)) or getattr(item, "path", None) or item.name

    def layer_paths(self) -> list[str]:
        """The nested paths of the plan's BN layers, in layer order.

        Returns:
            The paths.
        """
        return [self.path(layer) for layer, _ in self.bn_modes]

    def describe(self) -> str:
        """The update, frozen and BN sets, one path a line (what a dry run prints).

        Returns:
            The text.
        """
        lines = [
            "Patterns (update_part, freeze_part, restore_part, restore_exclude) are "
            "re.match-ed against these nested layer paths (sub-model/layer/weight), "
            "which stay the same when the model is saved and loaded.",
            f"Update set ({len(self.update_variables)} trainable variables):",
        ]
        lines += [f"  {self.path(v)}" for v in self.update_variables]
        lines.append(f"Frozen ({len(self.frozen_variables)} variables kept bit-identical):")
        lines += [f"  {self.path(v)}" for v in self.frozen_variables]
        lines.append(f"BN layers ({len(self.bn_modes)}):")
        lines += [
            f"  {self.path(layer)}: "
            f"{'in update set' if mode is BNMode.TRAIN else 'frozen'}, mode={mode}"
            for layer, mode in self.bn_modes
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()

    def layers_in(self, modes: Iterable[BNMode]) -> list[keras.layers.Layer]:
        """The BN layers whose mode is one of `modes`, in layer order.

        Args:
            modes: The modes to select.

        Returns:
            The layer objects.
        """
        wanted = set(modes)
        return [layer for layer, mode in self.bn_modes if mode in wanted]

    def updating_layers(self) -> list[keras.layers.Layer]:
        """The BN layers whose moving statistics a train step updates.

        Returns:
            The layers in `TRAIN` or `ADAPT` mode, in layer order.
        """
        return [layer for layer, mode in self.bn_modes if mode.updates_statistics]


def plan_update(
    model: keras.Model,
    update_part: Sequence[str] = (),
    freeze_part: Sequence[str] = (),
    freeze_batchnorm: bool = False,
    frozen_bn_mode: str | BNMode = BNMode.INFERENCE,
) -> UpdatePlan:
    """Splits `model` into the update set and the frozen rest.

    A BN layer is in the update set when its `moving_mean` is selected (so
    `update_part=["head/"]` covers every BN under `head/`) and the layer is
    trainable; `freeze_batchnorm` takes every BN layer out. A BN layer the
    model already built with `trainable=False` stays in inference mode.

    Args:
        model: A built Keras model.
        update_part: Regexes of variables to train; empty means all.
        freeze_part: Regexes of variables to keep frozen (wins over
            `update_part`).
        freeze_batchnorm: Freeze every BN layer's gamma, beta and statistics.
        frozen_bn_mode: `"inference"`, `"batch"` or `"adapt"` (or the
            `BNMode`), the mode of BN layers outside the update set.

    Returns:
        The `UpdatePlan`.

    Raises:
        ValueError: If a pattern matches nothing, `frozen_bn_mode` is not a
            frozen mode, the model has no variables, or nothing is left to
            train.
    """
    frozen_mode = _frozen_mode(frozen_bn_mode)
    variables = list(model.variables)
    if not variables:
        raise ValueError(
            f"Model {model.name!r} has no variables; build it (call it once) before "
            "planning the update set."
        )
    by_path = introspection.nested_variable_paths(model)
    path_of = {id(variable): path for path, variable in by_path.items()}
    selected = set(
        patterns.select(list(by_path), update_part, freeze_part, "update_part", "freeze_part")
    )
    bn_layers = batch_norm_layers(model)
    if freeze_batchnorm:
        for layer in bn_layers:
            selected -= {path_of[id(variable)] for variable in layer.variables}
    bn_modes = []
    for layer in bn_layers:
        if not layer.trainable:
            # Frozen by the model itself: Keras' rule, inference mode.
            bn_modes.append((layer, BNMode.INFERENCE))
        elif path_of[id(layer.moving_mean)] in selected:
            bn_modes.append((layer, BNMode.TRAIN))
        else:
            bn_modes.append((layer, frozen_mode))
    update_variables = tuple(
        variable for variable in model.trainable_variables if path_of.get(id(variable)) in selected
    )
    if not update_variables:
        raise ValueError(
            "The update set is empty: `update_part` / `freeze_part` / "
            f"`freeze_batchnorm` leave no trainable variable (update_part="
            f"{list(update_part)}, freeze_part={list(freeze_part)}). Known prefixes: "
            f"{patterns.known_prefixes(list(by_path))}."
        )
    moving = {
        id(variable)
        for layer, mode in bn_modes
        if mode.updates_statistics
        for variable in introspection.statistic_variables(layer).values()
    }
    changing = moving | {id(variable) for variable in update_variables}
    frozen = tuple(variable for variable in variables if id(variable) not in changing)
    paths = dict(path_of)
    paths.update(introspection.nested_layer_paths(model))
    return UpdatePlan(update_variables, frozen, tuple(bn_modes), paths)


def _frozen_mode(value: str | BNMode) -> BNMode:
    """`value` as a frozen `BNMode`; raises ValueError naming the choices."""
    try:
        mode = BNMode(value)
    except ValueError:
        mode = None
    if mode not in FROZEN_BN_MODES:
        raise ValueError(
            f"`frozen_bn_mode` must be one of {[m.value for m in FROZEN_BN_MODES]}; "
            f"received {value!r}."
        )
    return mode
