"""Independent NumPy references for batch normalization, in float64."""

import numpy as np


def reduction_axes(rank, feature_axes):
    feature_axes = [a % rank for a in feature_axes]
    return tuple(a for a in range(rank) if a not in feature_axes)


def broadcast_shape(shape, feature_axes):
    rank = len(shape)
    feature_axes = [a % rank for a in feature_axes]
    return [shape[a] if a in feature_axes else 1 for a in range(rank)]


def batch_norm_train(x, gamma, beta, feature_axes, epsilon):
    """Forward pass in training mode: returns (y, mean, biased variance)."""
    x = np.asarray(x, np.float64)
    axes = reduction_axes(x.ndim, feature_axes)
    shape = broadcast_shape(x.shape, feature_axes)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    g = np.reshape(gamma, shape)
    b = np.reshape(beta, shape)
    y = g * (x - mean) / np.sqrt(var + epsilon) + b
    return y, mean.reshape(-1), var.reshape(-1)


def batch_norm_train_grad(x, gamma, dy, feature_axes, epsilon):
    """The paper's closed-form backward: returns (dx, dgamma, dbeta)."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    axes = reduction_axes(x.ndim, feature_axes)
    shape = broadcast_shape(x.shape, feature_axes)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    inv_std = 1.0 / np.sqrt(var + epsilon)
    x_hat = (x - mean) * inv_std
    g = np.reshape(gamma, shape)
    dgamma = (dy * x_hat).sum(axis=axes)
    dbeta = dy.sum(axis=axes)
    dx = (
        g
        * inv_std
        * (
            dy
            - dy.mean(axis=axes, keepdims=True)
            - x_hat * (dy * x_hat).mean(axis=axes, keepdims=True)
        )
    )
    return dx, dgamma.reshape(-1), dbeta.reshape(-1)


def batch_norm_inference(x, gamma, beta, mean, var, feature_axes, epsilon):
    x = np.asarray(x, np.float64)
    shape = broadcast_shape(x.shape, feature_axes)
    a = np.reshape(gamma, shape) / np.sqrt(np.reshape(var, shape) + epsilon)
    return (x - np.reshape(mean, shape)) * a + np.reshape(beta, shape)


def masked_moments(x, mask, feature_axes):
    """Keras' mask convention: `mask` has x's shape without the last axis.

    The mask is expanded at the last axis and broadcast against `x` (whatever
    the feature axes are); returns (mean, biased variance, values per
    feature), the statistics being NaN for a feature without values.
    """
    x = np.asarray(x, np.float64)
    weights = np.broadcast_to(np.asarray(mask, np.float64)[..., None], x.shape)
    axes = reduction_axes(x.ndim, feature_axes)
    count = weights.sum(axis=axes, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (x * weights).sum(axis=axes, keepdims=True) / count
        var = (((x - mean) ** 2) * weights).sum(axis=axes, keepdims=True) / count
    return mean.reshape(-1), var.reshape(-1), count.reshape(-1)
