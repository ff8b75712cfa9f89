"""Tiny-YOLO head fine-tuning in a `tf.compat.v1` graph, on TF 2.21 without tf_keras.

The TF1 Tiny-YOLO recipe (a Chinese blog walkthrough of the TF1 train-op
wiring for partial fine-tuning) restores a backbone from a checkpoint and
trains only the head:

    update_vars = get_variables_to_restore(include=['tiny_yolo/yolov3_head'])
    update_ops = tf.get_collection(tf.GraphKeys.UPDATE_OPS)        # all of them
    with tf.control_dependencies(update_ops):
        train_op = optimizer.minimize(loss, var_list=update_vars)

`var_list` freezes the backbone's kernels, but the unfiltered UPDATE_OPS still
rewrite its moving statistics every step. This script runs that "naive"
wiring next to the "scoped" one, `tfbn.compat.v1.minimize_with_updates(...,
update_scope='tiny_yolo/yolov3_head')`, and shows the checker rejecting a
train op that forgot the updates. Run it with

    python examples/tiny_yolo_v1.py
"""

from __future__ import annotations

import os
import tempfile
from typing import NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfbn.compat.v1 as tfbn_v1  # noqa: E402

BACKBONE = "tiny_yolo/backbone"
HEAD = "tiny_yolo/yolov3_head"
IMAGE_SHAPE = (8, 8, 3)
NUM_OUTPUTS = 6
BATCH_NORM_DECAY = 0.9
BATCH_NORM_EPSILON = 1e-5
# The backbone statistics the checkpoint holds, far from the fine-tune data.
CHECKPOINT_BN_VALUES = {"moving_mean": 1.0, "moving_variance": 2.0, "gamma": 1.5, "beta": 0.3}


def _conv(x, filters, scope, is_training, batch_norm=True):
    """slim.conv2d(..., normalizer_fn=batch_norm) with a leaky ReLU, by hand."""
    with tf.compat.v1.variable_scope(scope):
        kernel = tf.compat.v1.get_variable(
            "weights",
            [3, 3, x.shape[-1], filters],
            initializer=tf.compat.v1.glorot_uniform_initializer(seed=len(scope)),
        )
        y = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")
        if not batch_norm:
            return y + tf.compat.v1.get_variable(
                "biases", [filters], initializer=tf.compat.v1.zeros_initializer()
            )
        endpoints = {"bn_input": y}
        y = tfbn_v1.batch_norm(
            y,
            decay=BATCH_NORM_DECAY,
            epsilon=BATCH_NORM_EPSILON,
            scale=True,
            is_training=is_training,
        )
        endpoints["bn_output"] = y
        return tf.nn.leaky_relu(y, alpha=0.1), endpoints


def build_tiny_yolo(images, is_training) -> dict[str, tf.Tensor]:
    """The model of the TF1 recipe: `tiny_yolo/{backbone, yolov3_head}`, one flag for all BNs.

    Returns:
        Endpoints: `predictions`, and `head_bn_input`/`head_bn_output` of the
        head's batch norm (for checking its statistics).
    """
    with tf.compat.v1.variable_scope("tiny_yolo"):
        with tf.compat.v1.variable_scope("backbone"):
            x, _ = _conv(images, 4, "conv1", is_training)
            x, _ = _conv(x, 4, "conv2", is_training)
        with tf.compat.v1.variable_scope("yolov3_head"):
            x, head = _conv(x, 4, "conv1", is_training)
            predictions = _conv(x, NUM_OUTPUTS, "conv2", is_training, batch_norm=False)
    return {
        "predictions": predictions,
        "head_bn_input": head["bn_input"],
        "head_bn_output": head["bn_output"],
    }


class TrainingGraph(NamedTuple):
    graph: tf.Graph
    images: tf.Tensor
    targets: tf.Tensor
    is_training: tf.Tensor
    endpoints: dict[str, tf.Tensor]
    loss: tf.Tensor
    train_op: tf.Operation
    backbone_saver: tf.compat.v1.train.Saver


def build_training_graph(wiring: str, learning_rate: float = 0.05) -> TrainingGraph:
    """Builds the fine-tune graph with one of three train-op wirings.

    Args:
        wiring: `"naive"` (the TF1 recipe: every UPDATE_OPS op), `"scoped"` (the head's
            update ops only, via `minimize_with_updates`), or `"unwired"` (no
            update ops at all, the classic bug).
        learning_rate: Gradient-descent learning rate.
    """
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, (None,) + IMAGE_SHAPE, name="images")
        targets = tf.compat.v1.placeholder(
            tf.float32, (None,) + IMAGE_SHAPE[:2] + (NUM_OUTPUTS,), name="targets"
        )
        is_training = tf.compat.v1.placeholder(tf.bool, [], name="is_training")
        endpoints = build_tiny_yolo(images, is_training)
        loss = tf.reduce_mean(tf.square(endpoints["predictions"] - targets))
        optimizer = tf.compat.v1.train.GradientDescentOptimizer(learning_rate)
        head_vars = tf.compat.v1.trainable_variables(HEAD)
        if wiring == "naive":
            update_ops = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
            with tf.control_dependencies(update_ops):
                train_op = optimizer.minimize(loss, var_list=head_vars)
        elif wiring == "scoped":
            train_op = tfbn_v1.minimize_with_updates(
                optimizer, loss, var_list=HEAD, update_scope=HEAD
            )
        elif wiring == "unwired":
            train_op = optimizer.minimize(loss, var_list=head_vars)
        else:
            raise ValueError(
                f"`wiring` must be 'naive', 'scoped' or 'unwired'; received {wiring!r}."
            )
        backbone_saver = tf.compat.v1.train.Saver(var_list=tf.compat.v1.global_variables(BACKBONE))
    return TrainingGraph(
        graph, images, targets, is_training, endpoints, loss, train_op, backbone_saver
    )


def write_backbone_checkpoint(prefix: str) -> dict[str, np.ndarray]:
    """Saves a "pretrained" backbone (known BN statistics); returns its values by name."""
    model = build_training_graph("scoped")
    with model.graph.as_default(), tf.compat.v1.Session(graph=model.graph) as session:
        session.run(tf.compat.v1.global_variables_initializer())
        for variable in tf.compat.v1.global_variables(BACKBONE):
            short_name = variable.op.name.rsplit("/", 1)[-1]
            if short_name in CHECKPOINT_BN_VALUES:
                session.run(
                    variable.assign(
                        np.full(variable.shape, CHECKPOINT_BN_VALUES[short_name], np.float32)
                    )
                )
        model.backbone_saver.save(session, prefix, write_meta_graph=False, write_state=False)
        return {v.op.name: session.run(v) for v in tf.compat.v1.global_variables(BACKBONE)}


def fine_tune_data(seed: int = 0, batch_size: int = 2):
    """Images ~ N(-3, 0.5^2), far from the checkpoint's statistics, and targets."""
    rng = np.random.default_rng(seed)
    images = rng.normal(-3.0, 0.5, (batch_size,) + IMAGE_SHAPE).astype(np.float32)
    targets = rng.normal(0.0, 1.0, (batch_size,) + IMAGE_SHAPE[:2] + (NUM_OUTPUTS,)).astype(
        np.float32
    )
    return images, targets


def _drift(before: dict[str, np.ndarray], after: dict[str, np.ndarray]):
    return {name: float(np.max(np.abs(after[name] - before[name]))) for name in before}


def main(steps: int = 10):
    images, targets = fine_tune_data()
    with tempfile.TemporaryDirectory() as directory:
        prefix = os.path.join(directory, "backbone.ckpt")
        checkpoint = write_backbone_checkpoint(prefix)
        for wiring in ("unwired", "naive", "scoped"):
            model = build_training_graph(wiring)
            with model.graph.as_default():
                try:
                    tfbn_v1.check_update_dependencies(model.train_op, scope=HEAD)
                    print(f"[{wiring}] checker: the train op runs the head's BN update ops")
                except tfbn_v1.MissingUpdateDependenciesError as error:
                    print(f"[{wiring}] checker, before the first step: {error}")
                    continue
                with tf.compat.v1.Session() as session:
                    session.run(tf.compat.v1.global_variables_initializer())
                    model.backbone_saver.restore(session, prefix)
                    feed = {model.images: images, model.targets: targets, model.is_training: True}
                    for _ in range(steps):
                        session.run(model.train_op, feed)
                    backbone = {
                        v.op.name: session.run(v) for v in tf.compat.v1.global_variables(BACKBONE)
                    }
                    drift = _drift(checkpoint, backbone)
                    moved = sorted(name for name, value in drift.items() if value > 0)
                    changed = moved or "none"
                    print(f"[{wiring}] backbone variables changed after {steps} steps: {changed}")
                    head_mean = session.run(
                        tf.compat.v1.global_variables(HEAD + "/conv1/BatchNorm/moving_mean")[0]
                    )
                    print(f"[{wiring}] head moving_mean: {np.round(head_mean, 4)}")
                    eval_loss = session.run(model.loss, {**feed, model.is_training: False})
                    print(
                        f"[{wiring}] eval loss (is_training=False, moving statistics): "
                        f"{eval_loss:.4f}"
                    )


if __name__ == "__main__":
    main()
