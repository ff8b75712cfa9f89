"""Keras layers of tfbn."""

from tfbn.layers.batch_normalization import BatchNormalization

__all__ = ["BatchNormalization"]
