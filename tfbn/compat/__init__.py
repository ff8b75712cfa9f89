"""Compatibility layers for code written against older TensorFlow APIs.

`tfbn.compat.v1`: graph-mode batch normalization with `UPDATE_OPS`, for
`tf.compat.v1` graphs on TF 2.21 with Keras 3 (no `tf_keras` needed).
"""

from tfbn.compat import v1

__all__ = ["v1"]
