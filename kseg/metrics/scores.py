"""One image's score under a competition metric, by the metric's name (the format registry names it).

Instance metrics take label images; mask metrics use nonzero pixels; H x W x K stacks (one mask per
class) score the mean over classes (Severstal's Dice).
"""

from __future__ import annotations

import numpy as np

from kseg.core.errors import DataError
from kseg.metrics import masks as metrics

METRICS = ("iou_map", "f2", "tgs_iou_map", "dice")


def score_image(truth: np.ndarray, prediction: np.ndarray, metric: str) -> float:
    """One image's score. Instance metrics take label images; mask metrics use nonzero pixels;
    H x W x K stacks (one mask per class) score the mean over classes (Severstal's Dice)."""
    if metric not in METRICS:
        raise DataError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if truth.ndim == 3 or prediction.ndim == 3:
        truth, prediction = _same_depth(truth, prediction)
        return float(np.mean([score_image(truth[..., k], prediction[..., k], metric)
                              for k in range(truth.shape[-1])]))
    if metric == "iou_map":
        return metrics.iou_map(truth, prediction)
    if metric == "f2":
        return metrics.airbus_f2(truth, prediction)
    if metric == "tgs_iou_map":
        return metrics.tgs_iou_map(truth, prediction)
    return metrics.dice(truth, prediction)


def _same_depth(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class stacks of equal depth (a class that one side never mentions is an empty mask)."""
    a = a if a.ndim == 3 else a[..., None]
    b = b if b.ndim == 3 else b[..., None]
    depth = max(a.shape[-1], b.shape[-1])
    pad = lambda x: np.concatenate([x, np.zeros((*x.shape[:2], depth - x.shape[-1]), x.dtype)], axis=-1)  # noqa: E731
    return pad(a), pad(b)


def class_iou(truth: np.ndarray, predicted: np.ndarray, score_class: int = 1) -> float:
    """Pixel IoU of one class of a semantic mask: ``truth == score_class`` against the predicted
    foreground. For class 0 (e.g. ISBI membranes, the background of the foreground channel) the
    complements are compared."""
    predicted = np.asarray(predicted, bool)
    if score_class == 0:
        return metrics.iou(truth == 0, ~predicted)
    return metrics.iou(truth == score_class, predicted)
