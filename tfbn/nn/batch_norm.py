"""Batch normalization as functions: training, inference and the update rule."""

# Every statistic a BN layer may keep, in the order updates are built:
# Keras 3 / tf-keras names, the renorm ones only with renorm, the count only
# for a cumulative average (momentum None).
STATISTIC_NAMES = (
    "moving_mean",
    "moving_variance",
    "moving_stddev",
    "renorm_mean",
    "renorm_stddev",
    "num_batches_tracked",
)
