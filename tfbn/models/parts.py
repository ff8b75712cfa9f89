"""Models made of named parts (`backbone`, `head`) that survive a save and a load.

A bundled model is a functional model whose parts are nested functional
sub-models. The part names are then part of the saved architecture, so the
nested layer paths that scope patterns match (`backbone/bn1/gamma`, see
`tfbn.layers.introspection.nested_variable_paths`) are the same in the
built model and in the model loaded back from its `.keras` file. Each part
is also built under a name scope of its name, so `variable.path` agrees
with the nested path in the built model.
"""

from __future__ import annotations

from collections.abc import Callable

import keras

from tfbn.layers import introspection


@keras.saving.register_keras_serializable(package="tfbn")
class PartsModel(keras.Model):
    """A functional model of nested parts; `get_layer` also finds layers inside the parts.

    Layer names are unique across the parts of a bundled model, so
    `model.get_layer("bn1")` finds the layer inside `backbone` as it did
    when the model was flat.
    """

    def get_layer(self, name=None, index=None):
        """The layer named `name` (top level first, then inside the parts), or at `index`.

        Args:
            name: A layer name.
            index: A top-level layer index (as in `keras.Model.get_layer`).

        Returns:
            The layer.

        Raises:
            ValueError: If no layer has that name (or the arguments are
                invalid, as in `keras.Model.get_layer`).
        """
        try:
            return super().get_layer(name, index)
        except ValueError:
            if name is None:
                raise
            found = [layer for layer in introspection.iter_layers(self) if layer.name == name]
            if len(found) != 1:
                raise
            return found[0]


def build_part(name: str, input_shape, body: Callable) -> keras.Model:
    """A named functional sub-model `body(inputs)`, built under a name scope `name`.

    Args:
        name: The part's name, the first component of its variables' paths.
        input_shape: The part's input shape without the batch axis.
        body: Maps the part's symbolic input to its symbolic output.

    Returns:
        The part as a functional `keras.Model`.
    """
    with keras.name_scope(name):
        inputs = keras.Input(tuple(input_shape), name=f"{name}_inputs")
        return keras.Model(inputs, body(inputs), name=name)
