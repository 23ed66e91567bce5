"""Benchmark: windowed U-Net weight map vs the full-image reference on a nuclei-like 256x256 label image.

Run from the repository root: ``python bench/weight_map.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import best_of, report  # noqa: E402

from kseg.data.weights import _reference_unet_weight_map, unet_weight_map  # noqa: E402

SHAPE = (256, 256)
N_INSTANCES = 40
W0, SIGMA = 10.0, 5.0
REPEATS = 20


def nuclei_labels(shape: tuple[int, int], n_instances: int, seed: int = 0) -> np.ndarray:
    """Non-overlapping disks/ellipses; about a third are placed against an earlier one so they touch."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    centres: list[tuple[float, float, float]] = []
    while len(centres) < n_instances:
        ry, rx = rng.uniform(4, 11, size=2)
        touching = bool(centres) and rng.random() < 0.35
        if touching:
            # Next to an earlier nucleus, slightly closer than the sum of the radii.
            py, px, pr = centres[rng.integers(len(centres))]
            theta = rng.uniform(0, 2 * np.pi)
            gap = 0.85 * (pr + (ry + rx) / 2)
            cy, cx = py + gap * np.sin(theta), px + gap * np.cos(theta)
        else:
            cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        angle = rng.uniform(0, np.pi)
        u = (rows - cy) * np.cos(angle) + (cols - cx) * np.sin(angle)
        v = -(rows - cy) * np.sin(angle) + (cols - cx) * np.cos(angle)
        inside = (u / ry) ** 2 + (v / rx) ** 2 <= 1.0
        area = np.count_nonzero(inside)
        overlap = np.count_nonzero(inside & (labels > 0)) / max(area, 1)
        # Touching nuclei accept a small overlap and are painted on background only, sharing a seam.
        if area and (overlap == 0 or (touching and overlap < 0.25)):
            centres.append((cy, cx, (ry + rx) / 2))
            labels[inside & (labels == 0)] = len(centres)
    return labels


def full_image_cv2(labels: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """The full-image algorithm with OpenCV's faster (but not bit-reproducible) EDT: a stronger baseline."""
    ids = np.unique(labels[labels > 0])
    counts = np.bincount((labels > 0).ravel(), minlength=2)
    weights = (labels.size / (2 * counts))[(labels > 0).astype(np.intp)]
    dists = np.stack(
        [cv2.distanceTransform((labels != k).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE) for k in ids]
    )
    dists.sort(axis=0)
    border = w0 * np.exp(-((dists[0] + dists[1]) ** 2) / (2.0 * sigma**2))
    return (weights + np.where(labels == 0, border, 0.0)).astype(np.float32)


def main() -> None:
    labels = nuclei_labels(SHAPE, N_INSTANCES)
    fast = unet_weight_map(labels, W0, SIGMA)
    reference = _reference_unet_weight_map(labels, W0, SIGMA)
    max_diff = float(np.abs(fast.astype(np.float64) - reference).max())
    assert max_diff <= 1e-4, f"windowed map differs from the reference by {max_diff:g}"
    assert np.abs(full_image_cv2(labels, W0, SIGMA) - reference).max() <= 1e-4

    print(f"{SHAPE[0]}x{SHAPE[1]}, {N_INSTANCES} instances, w0={W0}, sigma={SIGMA}; max |diff| = {max_diff:.2e}")
    candidate = best_of(lambda: unet_weight_map(labels, W0, SIGMA), REPEATS)
    baseline = best_of(lambda: _reference_unet_weight_map(labels, W0, SIGMA), REPEATS)
    report("unet_weight_map vs full-image reference (same scipy EDT)", candidate, baseline)
    same_edt = best_of(lambda: full_image_cv2(labels, W0, SIGMA), REPEATS)
    report("unet_weight_map vs full-image with OpenCV EDT", candidate, same_edt)


if __name__ == "__main__":
    main()
