"""Trains a small Keras model with tfbn.BatchNormalization and shows its statistics.

Run: python examples/quickstart.py

It fits a Conv-BN-ReLU classifier on generated data whose features have a
known mean and spread, then prints each BN layer's moving statistics next to
the statistics of the data they should track, and shows the explicit,
path-filtered update API.
"""

import keras
import numpy as np
import tensorflow as tf

import tfbn


def make_data(num_examples=512, seed=0):
    """Images with a channel offset of 3 and scale 2; labels from the mean colour."""
    rng = np.random.default_rng(seed)
    images = rng.normal(3.0, 2.0, (num_examples, 8, 8, 3)).astype("float32")
    labels = (images.mean(axis=(1, 2, 3)) > 3.0).astype("int32")
    return images, labels


def build_model():
    inputs = keras.Input((8, 8, 3))
    x = tfbn.BatchNormalization(momentum=0.9, name="input_bn")(inputs)
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(x)
    x = tfbn.BatchNormalization(momentum=0.9, name="conv_bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, name="classifier")(x)
    return keras.Model(inputs, outputs, name="quickstart")


def main():
    keras.utils.set_random_seed(0)
    images, labels = make_data()
    model = build_model()
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(images, labels, batch_size=32, epochs=3, verbose=2)

    input_bn = model.get_layer("input_bn")
    print("\ninput_bn moving statistics vs the data (per channel):")
    print("  moving_mean     ", np.round(input_bn.moving_mean.numpy(), 3))
    print("  data mean       ", np.round(images.mean(axis=(0, 1, 2)), 3))
    print("  moving_variance ", np.round(input_bn.moving_variance.numpy(), 3))
    print("  data variance   ", np.round(images.var(axis=(0, 1, 2)), 3))

    conv_bn = model.get_layer("conv_bn")
    before = conv_bn.moving_mean.numpy().copy()
    with tfbn.deferred_updates() as updates:
        model(images[:64], training=True)
        print("\npending updates:", updates.paths)
        updates.apply(include=["conv_bn"])  # only conv_bn's statistics move
        updates.discard()  # input_bn's update is dropped
    moved = np.abs(conv_bn.moving_mean.numpy() - before).max()
    print(f"conv_bn moving_mean moved by up to {moved:.4f}; input_bn unchanged")
    _, accuracy = model.evaluate(images, labels, verbose=0)
    print(f"inference-mode accuracy: {accuracy:.3f}")


if __name__ == "__main__":
    tf.get_logger().setLevel("ERROR")
    main()
