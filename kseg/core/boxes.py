"""Box formats, one module: pixel corners ``(x_min, y_min, x_max, y_max)`` (kseg's own, no +1),
``(x, y, w, h)`` (COCO, Kaggle box CSVs) and normalised ``(y_min, x_min, y_max, x_max)`` in [0, 1]
(what the detectors predict), and the one box IoU (NumPy or ``keras.ops``).
"""

from __future__ import annotations

import numpy as np


def as_boxes(boxes) -> np.ndarray:
    """Any (K, 4) box array (or an empty one) as float64 (K, 4); ValueError for another shape."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape (K, 4), got {arr.shape}")
    return arr


def xywh_to_xyxy(boxes) -> np.ndarray:
    """COCO json ``(x, y, w, h)`` -> ``(x_min, y_min, x_max, y_max)``."""
    b = as_boxes(boxes)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def xyxy_to_xywh(boxes) -> np.ndarray:
    """``(x_min, y_min, x_max, y_max)`` -> COCO json ``(x, y, w, h)``."""
    b = as_boxes(boxes)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def _area(boxes, xp):
    return xp.maximum(boxes[..., 2] - boxes[..., 0], 0.0) * xp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)


def iou_matrix(a, b, xp=np):
    """IoU of every box of ``a`` (..., N, 4) with every box of ``b`` (..., M, 4): (..., N, M).

    The one box IoU of kseg. Corner boxes in either axis order -- pixel ``(x_min, y_min, x_max,
    y_max)`` or normalised ``(y_min, x_min, y_max, x_max)`` -- give the same formula. ``xp`` is the
    array namespace: NumPy for the metrics, ``keras.ops`` for the in-graph callers
    (:mod:`kseg.nn.box_ops`). No +1 on extents; a box with a non-positive extent has zero area, and
    a zero union gives IoU 0 (the safe denominator keeps 0/0 out of values and gradients).
    """
    a = a[..., :, None, :]
    b = b[..., None, :, :]
    inter = (xp.maximum(xp.minimum(a[..., 2], b[..., 2]) - xp.maximum(a[..., 0], b[..., 0]), 0.0)
             * xp.maximum(xp.minimum(a[..., 3], b[..., 3]) - xp.maximum(a[..., 1], b[..., 1]), 0.0))
    union = _area(a, xp) + _area(b, xp) - inter
    return xp.where(union > 0.0, inter / xp.where(union > 0.0, union, 1.0), 0.0)


def pairwise_iou(boxes_a, boxes_b) -> np.ndarray:
    """IoU matrix ``(N, M)`` between pixel corner boxes, in float64 (see :func:`iou_matrix`)."""
    return iou_matrix(as_boxes(boxes_a), as_boxes(boxes_b))


def normalised_boxes(boxes_xyxy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel (x_min, y_min, x_max, y_max) -> the models' (y_min, x_min, y_max, x_max) in [0, 1]."""
    boxes = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
    scale = np.array([height, width, height, width], np.float32)
    return np.clip(boxes[:, [1, 0, 3, 2]] / scale, 0.0, 1.0)


def pixel_boxes(boxes_yxyx: np.ndarray, height: int, width: int) -> np.ndarray:
    """The models' normalised (y_min, x_min, y_max, x_max) -> pixel (x_min, y_min, x_max, y_max)."""
    boxes = np.asarray(boxes_yxyx, np.float32).reshape(-1, 4)
    return boxes[:, [1, 0, 3, 2]] * np.array([width, height, width, height], np.float32)
