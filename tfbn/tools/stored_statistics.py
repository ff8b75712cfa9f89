"""How population statistics become the values a BN layer stores.

A BN layer does not store "the mean and the variance" of its input: it stores
them under conventions (the variance estimator, renorm's stddev, the count
of a cumulative average). The tools that write statistics
(`tfbn.tools.population_statistics`) and the tools that compare against them
(`tfbn.tools.auditing`) both go through this module, and this module goes
through the core (`tfbn.nn`) for every rule the core defines, so each rule
is written once:

* the stored variance: `"biased"` stores the pooled biased variance as is,
  `"unbiased"` applies Bessel's `n / (n - 1)` with
  `tfbn.nn.moments.bessel_corrected`;
* renorm's stddev: `sqrt(variance + epsilon)` of the stored variance, as
  `tfbn.nn.renorm.updated_statistics` derives it from a batch;
* every statistic of `tfbn.layers.introspection.statistic_variables`, so a
  layer gets a consistent set of new values or none at all.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from tfbn.layers import introspection
from tfbn.nn import moments as moments_lib
from tfbn.nn import renorm as renorm_lib

ESTIMATORS = ("biased", "unbiased")


def stored_variance(biased_variance, count, estimator: str) -> np.ndarray:
    """The variance as a layer with `estimator` stores it, in float64.

    Args:
        biased_variance: The pooled biased (divide by N) variance, an array.
        count: N, the number of values behind each feature's variance; a
            scalar or an array broadcastable to `biased_variance`.
        estimator: `"biased"` or `"unbiased"` (a layer's
            `moving_variance_estimator`).

    Returns:
        A float64 array shaped like `biased_variance`.

    Raises:
        ValueError: For an unknown `estimator`, or for `"unbiased"` when some
            feature has fewer than 2 values (the correction is undefined).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {ESTIMATORS}; received {estimator!r}.")
    variance = np.asarray(biased_variance, np.float64)
    if estimator == "biased":
        return variance
    count = np.broadcast_to(np.asarray(count, np.float64), variance.shape)
    if np.any(count <= 1):
        raise ValueError(
            "The unbiased variance needs at least 2 values per feature; the data "
            f"gave {int(np.min(count))}. Pass more data (more or larger batches)."
        )
    corrected = moments_lib.bessel_corrected(tf.constant(variance), tf.constant(count))
    return corrected.numpy()


def renorm_stddev(variance, epsilon: float) -> np.ndarray:
    """Renorm's stddev of a stored variance, `sqrt(variance + epsilon)`, in float64.

    This is the stddev `tfbn.nn.renorm.updated_statistics` averages into
    `moving_stddev` and `renorm_stddev` (`tfbn.nn.renorm.stddev_from_variance`).

    Args:
        variance: The variance under the layer's estimator (an array).
        epsilon: The layer's epsilon.

    Returns:
        A float64 array shaped like `variance`.
    """
    variance = tf.constant(np.asarray(variance, np.float64))
    return renorm_lib.stddev_from_variance(variance, float(epsilon)).numpy()


def population_state(layer, mean, biased_variance, count, num_batches: int) -> dict:
    """The new value of every statistic of `layer` for the given population.

    The result has exactly the keys of
    `introspection.statistic_variables(layer)`:

    * `moving_mean`: `mean`;
    * `moving_variance`: `stored_variance(biased_variance, count, estimator)`;
    * renorm layers: `moving_stddev`, `renorm_mean` and `renorm_stddev`.
      `moving_stddev` and `renorm_stddev` are `renorm_stddev(moving_variance,
      epsilon)` and `renorm_mean` is `mean`: the renorm statistics describe
      the same population as the moving ones, so the first training batches
      after the recompute are corrected towards it (`r = 1, d = 0` for a
      batch that matches the population) rather than towards stale values;
    * cumulative-average layers (`momentum=None`): `num_batches_tracked` is
      `num_batches`, so further training weighs the next batch as
      `1 / (num_batches + 1)` of the average, as if it were one more batch
      of the population.

    Args:
        layer: A built tfbn or stock Keras BN layer.
        mean: The population mean, in the layer's parameter shape.
        biased_variance: The population's biased variance, same shape.
        count: Values per feature behind the statistics (broadcastable).
        num_batches: How many batches the statistics were pooled from.

    Returns:
        A dict from statistic name to a NumPy array (float32 statistics, an
        int64 count).

    Raises:
        ValueError: For a statistic this module has no rule for (so that no
            statistic is ever left inconsistent), or as `stored_variance`.
    """
    variance = stored_variance(biased_variance, count, introspection.variance_estimator(layer))
    names = introspection.statistic_variables(layer)
    rules: Mapping[str, np.ndarray] = {
        "moving_mean": np.asarray(mean, np.float64),
        "moving_variance": variance,
        "renorm_mean": np.asarray(mean, np.float64),
    }
    if "moving_stddev" in names or "renorm_stddev" in names:
        stddev = renorm_stddev(variance, layer.epsilon)
        rules = {**rules, "moving_stddev": stddev, "renorm_stddev": stddev}
    state = {}
    for name in names:
        if name == "num_batches_tracked":
            state[name] = np.asarray(num_batches, np.int64)
        elif name in rules:
            state[name] = rules[name].astype(np.float32)
        else:
            raise ValueError(
                f"BN layer {layer.name!r} keeps the statistic {name!r}, which "
                "tfbn.tools.stored_statistics has no population rule for."
            )
    return state
