"""Runs a BN layer forward and backward the same way in every test module."""

import tensorflow as tf


def forward_backward(layer, x, dy, jit_compile=None, **call_kwargs):
    """One training-mode call of `layer` and its gradients for upstream `dy`.

    Args:
        layer: A Keras BN layer (built or not).
        x: Input array.
        dy: Upstream gradient, shaped like the output.
        jit_compile: None runs eagerly; False in a `tf.function`; True in XLA.
        **call_kwargs: Extra call arguments (e.g. `mask`).

    Returns:
        NumPy arrays `[y, dx, *d(trainable weights)]` (dgamma, dbeta for a
        layer with both).
    """

    def run(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, **call_kwargs)
        return [y] + tape.gradient(y, [x] + layer.trainable_weights, output_gradients=dy)

    if jit_compile is not None:
        run = tf.function(run, jit_compile=jit_compile)
    return [t.numpy() for t in run(tf.constant(x), tf.constant(dy))]
