"""Competition metrics in plain NumPy: IoU-threshold mAP (DSB 2018, TGS Salt), Airbus F2, Dice, IoU.

Instance metrics start from one label-pair histogram: ``np.bincount(true_index * n_pred +
pred_index)`` counts every (true, pred) intersection at once, exactly, in integers (ids index it
directly when small, else are remapped to consecutive indices). Thresholds are integer percents
compared as ``100 * intersection > percent * union``, so an IoU of exactly 0.6 is not a hit at
0.6 and no float rounding can move a pair across a threshold. Keras metric classes live elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

THRESHOLD_PERCENTS = (50, 55, 60, 65, 70, 75, 80, 85, 90, 95)
"""IoU thresholds 0.50, 0.55, ..., 0.95 as integer percents (a hit needs IoU strictly above)."""

_PERCENTS = np.array(THRESHOLD_PERCENTS, dtype=np.int64)


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"true and predicted arrays differ in shape: {a.shape} vs {b.shape}")


def _pair_indices(
    true_labels: np.ndarray, pred_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
    """Histogram indices of both images: (true_index, pred_index, n_pred, true_ids, pred_ids).

    Small non-negative integer ids (the usual 0..K) index the histogram directly, which costs one
    pass; otherwise (huge, negative or float ids) both images are remapped to consecutive indices
    with np.unique(return_inverse), which sorts. ``*_ids[k]`` is the label id of index k.
    """
    true_flat, pred_flat = true_labels.ravel(), pred_labels.ravel()
    if true_flat.size and true_flat.dtype.kind in "biu" and pred_flat.dtype.kind in "biu":
        low = min(true_flat.min(), pred_flat.min())
        n_true, n_pred = int(true_flat.max()) + 1, int(pred_flat.max()) + 1
        if low >= 0 and n_true * n_pred <= 4 * true_flat.size + 65536:
            return true_flat, pred_flat, n_pred, np.arange(n_true), np.arange(n_pred)
    true_ids, true_index = np.unique(true_flat, return_inverse=True)
    pred_ids, pred_index = np.unique(pred_flat, return_inverse=True)
    return true_index.ravel(), pred_index.ravel(), pred_ids.size, true_ids, pred_ids


def intersections_unions(
    true_labels: np.ndarray, pred_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(intersection, union, true_ids, pred_ids): int64 pixel counts for every object pair.

    Rows follow ``true_ids`` and columns ``pred_ids`` (sorted, background 0 excluded; ids need
    not be consecutive). One bincount over label pairs replaces a loop over pairs.
    """
    true_labels = np.asarray(true_labels)
    pred_labels = np.asarray(pred_labels)
    _check_same_shape(true_labels, pred_labels)
    true_index, pred_index, n_pred, true_ids, pred_ids = _pair_indices(true_labels, pred_labels)
    n_true = true_ids.size
    codes = true_index.astype(np.intp)  # a fresh copy, so the in-place steps below are safe
    codes *= n_pred
    codes += pred_index.astype(np.intp, copy=False)
    pairs = np.bincount(codes, minlength=n_true * n_pred).reshape(n_true, n_pred)
    true_area, pred_area = pairs.sum(axis=1), pairs.sum(axis=0)
    # Keep objects that are present (direct indexing leaves gaps) and are not background 0.
    true_keep = (true_area > 0) & (true_ids != 0)
    pred_keep = (pred_area > 0) & (pred_ids != 0)
    intersection = pairs[np.ix_(true_keep, pred_keep)].astype(np.int64, copy=False)
    true_area = true_area[true_keep].astype(np.int64, copy=False)
    pred_area = pred_area[pred_keep].astype(np.int64, copy=False)
    union = true_area[:, None] + pred_area[None, :] - intersection
    return intersection, union, true_ids[true_keep], pred_ids[pred_keep]


def iou_matrix(
    true_labels: np.ndarray, pred_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(iou, true_ids, pred_ids): float64 IoU of every true object (rows) with every prediction."""
    intersection, union, true_ids, pred_ids = intersections_unions(true_labels, pred_labels)
    # Every listed object has at least one pixel, so every union is positive.
    return intersection / union, true_ids, pred_ids


def _true_positives(
    true_labels: np.ndarray, pred_labels: np.ndarray
) -> tuple[np.ndarray, int, int]:
    """(true positives per threshold, number of true objects, number of predicted objects).

    No assignment solving is needed: in a label image objects are disjoint, and IoU > 0.5 means
    the intersection is more than half of the union, hence more than half of each object. A true
    object cannot give more than half of itself to two disjoint predictions (and vice versa), so
    at every threshold >= 0.5 each object has at most one partner and counting hits counts TPs.
    """
    intersection, union, true_ids, pred_ids = intersections_unions(true_labels, pred_labels)
    touching = intersection > 0
    inter, uni = intersection[touching], union[touching]
    hits = 100 * inter[None, :] > _PERCENTS[:, None] * uni[None, :]
    return hits.sum(axis=1), true_ids.size, pred_ids.size


def iou_map_per_threshold(true_labels: np.ndarray, pred_labels: np.ndarray) -> np.ndarray:
    """Precision TP / (TP + FP + FN) at each of ``THRESHOLD_PERCENTS`` for one image (DSB 2018).

    No objects on either side gives 1 at every threshold; exactly one side empty gives 0.
    """
    tp, n_true, n_pred = _true_positives(true_labels, pred_labels)
    if n_true == 0 and n_pred == 0:
        return np.ones(_PERCENTS.size)
    # TP + FP + FN = TP + (n_pred - TP) + (n_true - TP)
    return tp / (n_true + n_pred - tp)


def iou_map(true_labels: np.ndarray, pred_labels: np.ndarray) -> float:
    """DSB 2018 score of one image: precision averaged over IoU thresholds 0.50 ... 0.95."""
    return float(iou_map_per_threshold(true_labels, pred_labels).mean())


def mean_iou_map(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Dataset score: the mean of ``iou_map`` over (true_labels, pred_labels) image pairs."""
    scores = [iou_map(true, pred) for true, pred in pairs]
    if not scores:
        raise ValueError("mean_iou_map needs at least one (true, pred) image pair")
    return float(np.mean(scores))


def airbus_f2(true_labels: np.ndarray, pred_labels: np.ndarray) -> float:
    """Airbus Ship Detection score of one image: F2 = 5TP / (5TP + 4FN + FP), threshold-averaged.

    Same empty rules as ``iou_map``: nothing on either side gives 1, one side empty gives 0.
    """
    tp, n_true, n_pred = _true_positives(true_labels, pred_labels)
    if n_true == 0 and n_pred == 0:
        return 1.0
    # 5TP + 4FN + FP = 5TP + 4(n_true - TP) + (n_pred - TP) = 4 n_true + n_pred
    return float(np.mean(5 * tp / (4 * n_true + n_pred)))


def _binary_counts(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int]:
    """(|a and b|, |a|, |b|) of two masks, nonzero = foreground."""
    a = np.asarray(a)
    b = np.asarray(b)
    _check_same_shape(a, b)
    a = a if a.dtype == np.bool_ else a != 0
    b = b if b.dtype == np.bool_ else b != 0
    return int(np.count_nonzero(a & b)), int(np.count_nonzero(a)), int(np.count_nonzero(b))


def tgs_iou_map(true_mask: np.ndarray, pred_mask: np.ndarray) -> float:
    """TGS Salt score of one image: the whole mask is one object.

    Both empty gives 1, one empty gives 0, otherwise the fraction of thresholds the masks' IoU
    strictly exceeds.
    """
    intersection, true_area, pred_area = _binary_counts(true_mask, pred_mask)
    union = true_area + pred_area - intersection
    if union == 0:
        return 1.0
    return float(np.mean(100 * intersection > _PERCENTS * union))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient 2|a and b| / (|a| + |b|) of binary masks; both empty gives 1."""
    intersection, area_a, area_b = _binary_counts(a, b)
    total = area_a + area_b
    return 1.0 if total == 0 else 2 * intersection / total


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of binary masks; both empty gives 1."""
    intersection, area_a, area_b = _binary_counts(a, b)
    union = area_a + area_b - intersection
    return 1.0 if union == 0 else intersection / union
