"""Small models and trainer checkpoints shared by the checkpoint test modules."""

import keras
import numpy as np
import tensorflow as tf

import tfbn
from tfbn.finetune import checkpoint as checkpoint_lib


def model(num_classes, extra_head_layer=False):
    inputs = keras.Input((6,))
    with keras.name_scope("backbone"):
        x = keras.layers.Dense(4, use_bias=False, name="dense1")(inputs)
        x = tfbn.BatchNormalization(name="bn1")(x)
        x = keras.layers.Dense(4, use_bias=False, name="dense2")(x)
        x = tfbn.BatchNormalization(name="bn2")(x)
    with keras.name_scope("head"):
        if extra_head_layer:
            x = keras.layers.Dense(4, name="extra")(x)
        x = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, x)


def save_trained(tmp_path):
    """A trained-looking 80-class model with known BN statistics, saved with Adam slots."""
    keras.utils.set_random_seed(0)
    full = model(80)
    for index, name in enumerate(["bn1", "bn2"]):
        layer = full.get_layer(name)
        layer.moving_mean.assign(np.full(4, 1.0 + index, np.float32))
        layer.moving_variance.assign(np.full(4, 2.0 + index, np.float32))
        layer.gamma.assign(np.full(4, 1.5, np.float32))
        layer.beta.assign(np.full(4, 0.3, np.float32))
    optimizer = keras.optimizers.Adam()
    optimizer.build(full.trainable_variables)
    ckpt = checkpoint_lib.make_checkpoint(
        full, optimizer, tf.Variable(7, dtype=tf.int64), tf.Variable(0, dtype=tf.int64)
    )
    prefix = ckpt.save(str(tmp_path / "ckpt"))
    return prefix, {v.path: v.numpy() for v in full.variables}
