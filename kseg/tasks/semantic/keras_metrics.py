"""Stateful Keras metrics for training logs: dataset-level mask IoU and Dice of one channel.

Both threshold the prediction (and the target, at 0.5) and accumulate the intersection and the
two areas over every ``update_state`` call, so the epoch value is the IoU / Dice of all pixels
seen, not a mean of batch values. The competition scores live in ``kseg.metrics``.
An epoch where target and prediction are both empty scores 1 (a perfect match), as the
competitions score an empty image predicted empty. Counts are float32, like ``keras.metrics.IoU``
(exact up to 2**24 pixels per batch; beyond that the epoch sums carry float32 rounding).
"""

from __future__ import annotations

import keras
from keras import ops

__all__ = ["MaskDice", "MaskIoU"]


class _MaskOverlap(keras.metrics.Metric):
    """Accumulates intersection and the true / predicted areas of ``channel`` after thresholding."""

    def __init__(self, threshold=0.5, channel=0, name=None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.threshold = float(threshold)
        self.channel = int(channel)
        self.intersection = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="intersection")
        self.true_area = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="true_area")
        self.pred_area = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="pred_area")

    def _select(self, x, rank):
        """The metric's channel of ``x`` as (B, H, W); ``x`` may lack the channel axis."""
        x = ops.convert_to_tensor(x)
        if len(x.shape) == rank:
            x = x[..., self.channel]
        return x

    def update_state(self, y_true, y_pred, sample_weight=None):
        """``sample_weight``: None, per image ``(B,)`` or per pixel ``(B, H, W[, 1])``."""
        if y_true is None:
            raise ValueError(f"metric {self.name!r} needs the target as y: a model that owns its loss "
                             "still needs fit/evaluate(x, y=target) (and validation_data=(x, target)) "
                             "for compiled metrics")
        y_pred = ops.convert_to_tensor(y_pred)
        rank = len(y_pred.shape)
        pred = ops.cast(ops.cast(y_pred[..., self.channel], "float32") > self.threshold, "float32")
        true = ops.cast(ops.cast(self._select(y_true, rank), "float32") > 0.5, "float32")
        overlap = pred * true
        if sample_weight is not None:
            weight = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
            if len(weight.shape) == rank:
                weight = ops.squeeze(weight, axis=-1)
            while len(weight.shape) < rank - 1:
                weight = ops.expand_dims(weight, -1)
            overlap, pred, true = overlap * weight, pred * weight, true * weight
        self.intersection.assign_add(ops.sum(overlap))
        self.true_area.assign_add(ops.sum(true))
        self.pred_area.assign_add(ops.sum(pred))

    def reset_state(self):
        for variable in (self.intersection, self.true_area, self.pred_area):
            variable.assign(ops.zeros((), "float32"))

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold, "channel": self.channel}


@keras.saving.register_keras_serializable(package="kseg")
class MaskIoU(_MaskOverlap):
    """IoU ``|T & P| / |T | P|`` of thresholded ``channel`` over every batch since the last reset."""

    def __init__(self, threshold=0.5, channel=0, name="mask_iou", dtype=None):
        super().__init__(threshold=threshold, channel=channel, name=name, dtype=dtype)

    def result(self):
        union = self.true_area + self.pred_area - self.intersection
        return ops.where(union > 0, ops.divide_no_nan(self.intersection, union), 1.0)


@keras.saving.register_keras_serializable(package="kseg")
class MaskDice(_MaskOverlap):
    """Dice ``2 |T & P| / (|T| + |P|)`` of thresholded ``channel`` over every batch since the last reset."""

    def __init__(self, threshold=0.5, channel=0, name="mask_dice", dtype=None):
        super().__init__(threshold=threshold, channel=channel, name=name, dtype=dtype)

    def result(self):
        total = self.true_area + self.pred_area
        return ops.where(total > 0, ops.divide_no_nan(2.0 * self.intersection, total), 1.0)
