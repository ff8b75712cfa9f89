"""Partial fine-tuning for `model.fit` users: `tfbn.partial_finetune`.

`train.py` carries an `UpdatePlan` out in its own train step
(`tfbn.finetune.train_step`). `partial_finetune` carries the same plan out
inside Keras' `model.fit`, for a model the user compiles and fits:

* every trainable variable outside the update set gets `trainable = False`,
  so Keras' train step neither differentiates nor updates it;
* a BN layer in `inference` mode gets `layer.trainable = False` (Keras'
  rule: moving statistics, no update), as `train.py` runs it;
* the model's `train_step` is wrapped so that the forward pass runs under
  `tfbn.deferred_updates()`: the updates of tfbn BN layers in the update set
  and in `adapt` mode are applied after the gradients, those of `batch`
  mode are discarded. Stock Keras BN layers update inside their call, so
  the wrapper keeps a copy of a `batch`-mode layer's statistics and writes it
  back after the step, as `train.py` does.

The module is named after what it serves (`model.fit`); the function keeps
the name users call (`tfbn.partial_finetune`).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from tfbn.deferred_updates import deferred_updates
from tfbn.finetune.update_plan import BNMode, UpdatePlan, plan_update
from tfbn.layers import introspection
from tfbn.layers.batch_normalization import BatchNormalization

# Where the trainable flags before the first call are kept, so a second call
# plans from the model as the user built it, not from the first plan's result.
_ORIGINAL_STATE = "_tfbn_partial_finetune_original"


def partial_finetune(
    model: keras.Model,
    update_part: Sequence[str] = (),
    freeze_part: Sequence[str] | None = None,
    frozen_bn_mode: str | BNMode = "inference",
    freeze_batchnorm: bool = False,
) -> UpdatePlan:
    """Makes `model.fit` train only the update set, with frozen BN layers as in `train.py`.

    Call it on a built model before `model.compile`. Patterns are regexes
    `re.match`-ed against nested variable paths (`backbone/bn1/gamma`, or a
    flat model's `Conv_1/kernel`); `print(plan)` lists them.

    Args:
        model: A built Keras model (tfbn or stock Keras BN layers).
        update_part: Regexes of the variables to train; empty means all. A BN
            layer whose moving statistics are selected is in the update set
            (batch statistics, updates applied).
        freeze_part: Regexes of variables to keep frozen even when
            `update_part` selects them.
        frozen_bn_mode: Mode of BN layers outside the update set:
            `"inference"` (moving statistics, statistics bit-identical),
            `"batch"` (batch statistics, statistics bit-identical) or
            `"adapt"` (batch statistics, statistics updated: AdaBN).
        freeze_batchnorm: Take every BN layer out of the update set.

    Returns:
        The `UpdatePlan`: `update_variables`, `frozen_variables` and each BN
        layer's mode; `str(plan)` prints them by path.

    Raises:
        ValueError: If the model is not built or already compiled, a pattern
            matches nothing, nothing is left to train, `frozen_bn_mode` is
            unknown, or an `inference`-mode BN layer would have trainable
            gamma or beta.
    """
    if not model.variables:
        raise ValueError(
            f"`model` {model.name!r} has no variables yet; build it (call it on a batch or "
            "call model.build(input_shape)) before `partial_finetune`."
        )
    if getattr(model, "compiled", False):
        raise ValueError(
            f"`model` {model.name!r} is already compiled; call `partial_finetune` before "
            "`model.compile`, so that the compiled train step sees the plan."
        )
    _restore_original_state(model)
    plan = plan_update(model, update_part, freeze_part or (), freeze_batchnorm, frozen_bn_mode)
    update_ids = {id(variable) for variable in plan.update_variables}
    for layer, mode in plan.bn_modes:
        if mode is BNMode.INFERENCE and any(id(v) in update_ids for v in layer.variables):
            raise ValueError(
                f"BN layer {plan.path(layer)!r} is frozen in inference mode, but `update_part` "
                "selects its gamma or beta: Keras runs a layer with trainable=False in "
                "inference mode and trains none of its weights. Select the whole layer "
                f"(e.g. {plan.path(layer) + '/'!r}), exclude gamma and beta with "
                "`freeze_part`, or use frozen_bn_mode='batch'."
            )
    _save_original_state(model)
    for variable in model.trainable_variables:
        if id(variable) not in update_ids:
            variable.trainable = False
    for layer in plan.layers_in([BNMode.INFERENCE]):
        layer.trainable = False
    model.train_step = _plan_train_step(model.train_step, plan)
    return plan


def _plan_train_step(keras_train_step, plan: UpdatePlan):
    """Keras' `train_step`, with the plan's BN updates applied or discarded after it."""
    updating = plan.updating_layers()
    stock_batch_mode = [
        layer
        for layer in plan.layers_in([BNMode.BATCH])
        if not isinstance(layer, BatchNormalization)
    ]

    def train_step(data):
        # Read before the forward pass, which updates stock layers in place.
        kept = [
            (variable, tf.identity(variable.value))
            for layer in stock_batch_mode
            for variable in introspection.statistic_variables(layer).values()
        ]
        with deferred_updates() as updates:
            logs = keras_train_step(data)
            updates.apply(layers=updating)
            updates.discard()
        for variable, value in kept:
            variable.assign(value)
        return logs

    # Lets a later `partial_finetune` call unwrap it (`_restore_original_state`).
    train_step.keras_train_step = keras_train_step
    return train_step


def _save_original_state(model: keras.Model) -> None:
    if hasattr(model, _ORIGINAL_STATE):
        return
    state = {
        "variables": [(variable, variable.trainable) for variable in model.variables],
        "layers": [(layer, layer.trainable) for layer in introspection.iter_layers(model)],
    }
    # object.__setattr__: Keras would otherwise track the lists as model state.
    object.__setattr__(model, _ORIGINAL_STATE, state)


def _restore_original_state(model: keras.Model) -> None:
    state = getattr(model, _ORIGINAL_STATE, None)
    if state is None:
        return
    for layer, trainable in state["layers"]:
        layer.trainable = trainable
    for variable, trainable in state["variables"]:
        variable.trainable = trainable
    wrapped = getattr(model.train_step, "keras_train_step", None)
    if wrapped is not None:
        model.train_step = wrapped
