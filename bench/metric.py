"""Benchmark: DSB IoU-mAP from one label-pair bincount vs a per-pair loop over full-image masks.

512 x 512 image, 100 true random disks and 100 predicted ones (jittered copies plus misses and
spurious objects). Both methods must give the same score before anything is timed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import best_of, report  # noqa: E402

from kseg.metrics.masks import THRESHOLD_PERCENTS, iou_map

SHAPE = (512, 512)
N_OBJECTS = 100


def disk_labels(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """True disks and a prediction: most shifted/resized a little, some missed, some spurious."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    true = np.zeros(SHAPE, np.int32)
    pred = np.zeros(SHAPE, np.int32)
    for k in range(1, N_OBJECTS + 1):
        cy, cx = rng.integers(20, SHAPE[0] - 20, 2)
        radius = rng.integers(6, 16)
        true[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = k
        if rng.random() < 0.9:  # found, with some error in position and size
            cy, cx = cy + rng.integers(-2, 3), cx + rng.integers(-2, 3)
            radius = radius + rng.integers(-1, 2)
        else:  # missed; a spurious prediction elsewhere instead
            cy, cx = rng.integers(20, SHAPE[0] - 20, 2)
        pred[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = k
    return true, pred


def per_pair_iou_map(true: np.ndarray, pred: np.ndarray) -> float:
    """Baseline: one full-image comparison per (true, pred) pair, same exact threshold rule."""
    true_ids = [i for i in np.unique(true) if i != 0]
    pred_ids = [j for j in np.unique(pred) if j != 0]
    if not true_ids and not pred_ids:
        return 1.0
    inter = np.zeros((len(true_ids), len(pred_ids)), np.int64)
    union = np.ones_like(inter)
    for a, i in enumerate(true_ids):
        for b, j in enumerate(pred_ids):
            inter[a, b] = np.logical_and(true == i, pred == j).sum()
            union[a, b] = np.logical_or(true == i, pred == j).sum()
    scores = []
    for pct in THRESHOLD_PERCENTS:
        tp = int((100 * inter > pct * union).sum())
        scores.append(tp / (len(true_ids) + len(pred_ids) - tp))
    return float(np.mean(scores))


def histogram2d_iou_map(true: np.ndarray, pred: np.ndarray) -> float:
    """Second baseline: the widely copied np.histogram2d kernel (needs consecutive labels)."""
    n_true, n_pred = len(np.unique(true)), len(np.unique(pred))
    inter = np.histogram2d(true.ravel(), pred.ravel(), bins=(n_true, n_pred))[0]
    area_true = np.histogram(true, bins=n_true)[0][:, None]
    area_pred = np.histogram(pred, bins=n_pred)[0][None, :]
    inter = inter[1:, 1:].astype(np.int64)
    union = area_true[1:] + area_pred[:, 1:] - inter
    scores = []
    for pct in THRESHOLD_PERCENTS:
        tp = int((100 * inter > pct * union).sum())
        scores.append(tp / (n_true - 1 + n_pred - 1 - tp))
    return float(np.mean(scores))


def main() -> None:
    true, pred = disk_labels(np.random.default_rng(2018))
    # Consecutive relabelling (disks that were fully covered vanish) for the histogram2d kernel.
    true = np.unique(true, return_inverse=True)[1].reshape(SHAPE).astype(np.int32)
    pred = np.unique(pred, return_inverse=True)[1].reshape(SHAPE).astype(np.int32)
    ours = iou_map(true, pred)
    assert ours == per_pair_iou_map(true, pred), "per-pair baseline disagrees"
    assert ours == histogram2d_iou_map(true, pred), "histogram2d baseline disagrees"
    print(
        f"{SHAPE[0]}x{SHAPE[1]}, {true.max()} true vs {pred.max()} predicted objects, "
        f"IoU-mAP {ours:.4f}"
    )
    candidate = best_of(lambda: iou_map(true, pred), repeats=20)
    report("iou_map vs per-pair loop", candidate, best_of(lambda: per_pair_iou_map(true, pred), 1))
    report("iou_map vs histogram2d", candidate, best_of(lambda: histogram2d_iou_map(true, pred), 5))


if __name__ == "__main__":
    main()
