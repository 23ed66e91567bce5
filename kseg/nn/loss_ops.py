"""keras.ops pieces that several families' losses share."""

from __future__ import annotations

import keras
from keras import ops


def clip_probabilities(p):
    """Probabilities clipped to ``[eps, 1 - eps]`` (``keras.config.epsilon()``) before a log."""
    eps = keras.config.epsilon()
    return ops.clip(p, eps, 1.0 - eps)


def smooth_l1_positives(target_offsets, pred_offsets, positive):
    """Smooth L1 (Huber, delta 1) summed over the 4 coordinates, zero off the positives: (B, N).

    The difference is zeroed before the Huber term (not the loss after it), so arbitrary or
    non-finite offsets stored for background / ignored boxes cannot leak NaN into value or gradient.
    """
    diff = ops.where(positive[..., None], pred_offsets - target_offsets, 0.0)
    abs_diff = ops.abs(diff)
    quadratic = ops.minimum(abs_diff, 1.0)
    return ops.sum(0.5 * quadratic * quadratic + (abs_diff - quadratic), axis=-1)
