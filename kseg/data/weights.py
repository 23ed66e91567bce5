"""Per-pixel loss weight maps: class balancing and the U-Net instance-border term.

Owns ``unet_weight_map`` (Ronneberger et al. 2015, eq. 2), its full-image reference
``_reference_unet_weight_map`` used by tests and benchmarks, and ``class_balance_map`` for
semantic masks.

Rules used throughout:

* Class balance ``"balanced"``: ``w_c = total / (n_present * count_c)`` over the classes present in
  the image (the inverse-frequency rule of scikit-learn's ``class_weight="balanced"``). The
  pixel-mean of the map is then exactly 1, so the loss scale does not depend on how much
  foreground an image has. With a single class present every weight is 1. A dict maps class
  index to weight, classes it does not name weigh 1; ``None`` means all ones. For label images
  the classes are background (0) and foreground (any instance, 1).
* Border term ``w0 * exp(-(d1 + d2)**2 / (2 * sigma**2))``, with ``sigma`` the standard deviation
  in pixels (not its square), is added on background pixels only, and only when the image holds
  at least two instances. ``d1``/``d2`` are Euclidean distances to the nearest pixel of the
  nearest and the second-nearest instance.
* Truncation: the fast map keeps the border term where ``d1 + d2 <= R`` with
  ``R = ceil(sigma * sqrt(2 * ln(w0 / eps)))`` and sets it to 0 elsewhere, where the exact term is
  below ``eps``. So it differs from the exact map by less than ``eps`` (default 1e-5) anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy import ndimage

__all__ = ["class_balance_map", "unet_weight_map"]

ClassWeights = str | Mapping[int, float] | None


def class_balance_map(mask_or_labels: np.ndarray, class_weights: ClassWeights = "balanced") -> np.ndarray:
    """Per-pixel weight of each pixel's class, so rare classes count as much as common ones.

    ``mask_or_labels`` is an H x W array of class indices (uint8 semantic mask, or bool). For an
    instance label image pass ``labels > 0`` (``unet_weight_map`` does this itself), otherwise
    every instance id counts as its own class. Returns float32 H x W.
    """
    classes = np.asarray(mask_or_labels)
    if classes.ndim != 2:
        raise ValueError(f"expected an H x W class-index array, got shape {classes.shape}")
    if classes.dtype == bool:
        classes = classes.view(np.uint8)
    if not np.issubdtype(classes.dtype, np.integer):
        raise TypeError(f"class indices must be integers or bool, got {classes.dtype}")
    if class_weights is None:
        return np.ones(classes.shape, np.float32)
    if classes.size == 0:
        return np.zeros(classes.shape, np.float32)

    # Dense lookup table when the indices are small non-negative ints (the usual mask), else
    # compact them first.
    lo, hi = int(classes.min()), int(classes.max())
    if lo >= 0 and hi <= max(255, classes.size):
        values = np.arange(hi + 1)
        index = classes
        counts = np.bincount(classes.ravel(), minlength=hi + 1)
    else:
        values, inverse, counts = np.unique(classes, return_inverse=True, return_counts=True)
        index = inverse.reshape(classes.shape)

    table = _class_weight_table(values, counts, class_weights)
    return table[index]


def unet_weight_map(
    labels: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    *,
    class_weights: ClassWeights = "balanced",
    eps: float = 1e-5,
) -> np.ndarray:
    """U-Net weight map: class balance plus a border term that pushes the net to separate touching instances.

    ``labels``: int H x W, 0 = background, any positive ids (need not be consecutive).
    Cost grows with instances x (bbox + 2R)^2 rather than instances x pixels: each instance's
    distance transform is computed only inside its bounding box grown by ``R`` (see module
    docstring), which is exact there because the instance lies wholly inside it, and outside it
    the instance is farther than ``R`` so it cannot be one of the two nearest for any pixel whose
    term reaches ``eps``. Returns float32 H x W.

    SciPy's exact EDT is used rather than OpenCV's faster ``DIST_MASK_PRECISE``: OpenCV's result
    varies in the last float32 bit from call to call (it depends on buffer alignment), which
    would make preprocessing, its cache and seeded training runs irreproducible.
    """
    labels = _check_labels(labels)
    _check_params(w0, sigma, eps)
    weights = class_balance_map(labels > 0, class_weights)
    if w0 == 0 or labels.size == 0:
        return weights

    compact = _compact_ids(labels)
    boxes = ndimage.find_objects(compact)
    instances = [(k, box) for k, box in enumerate(boxes, start=1) if box is not None]
    if len(instances) < 2:
        return weights

    radius = _cutoff_radius(w0, sigma, eps)
    height, width = labels.shape
    nearest = np.full(labels.shape, np.inf, np.float32)
    second = np.full(labels.shape, np.inf, np.float32)
    for k, (rows, cols) in instances:
        window = (
            slice(max(rows.start - radius, 0), min(rows.stop + radius, height)),
            slice(max(cols.start - radius, 0), min(cols.stop + radius, width)),
        )
        dist = ndimage.distance_transform_edt(compact[window] != k).astype(np.float32)
        near_w, second_w = nearest[window], second[window]
        # second = min(second, max(nearest, dist)) must read nearest before it is lowered.
        np.minimum(second_w, np.maximum(near_w, dist), out=second_w)
        np.minimum(near_w, dist, out=near_w)

    total = nearest
    total += second  # inf where fewer than two instances lie within R
    keep = (total <= radius) & (labels == 0)
    close = total[keep].astype(np.float64)
    weights[keep] += (w0 * np.exp(-(close * close) / (2.0 * sigma * sigma))).astype(np.float32)
    return weights


def _reference_unet_weight_map(
    labels: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    *,
    class_weights: ClassWeights = "balanced",
) -> np.ndarray:
    """Exact, straightforward map (one full-image EDT per instance, then sort): the yardstick for tests and bench."""
    labels = _check_labels(labels)
    weights = class_balance_map(labels > 0, class_weights)
    ids = np.unique(labels[labels > 0])
    if len(ids) < 2 or w0 == 0:
        return weights
    dists = np.stack([ndimage.distance_transform_edt(labels != k) for k in ids])
    dists.sort(axis=0)
    d1, d2 = dists[0], dists[1]
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
    return (weights + np.where(labels == 0, border, 0.0)).astype(np.float32)


def _class_weight_table(values: np.ndarray, counts: np.ndarray, class_weights: ClassWeights) -> np.ndarray:
    """float32 weight for each entry of ``values`` (class indices) given their pixel ``counts``."""
    table = np.ones(len(values), np.float32)
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(f"class_weights must be 'balanced', a dict or None, got {class_weights!r}")
        present = counts > 0
        n_present = int(present.sum())
        if n_present > 1:
            table[present] = counts.sum() / (n_present * counts[present])
        return table
    if isinstance(class_weights, Mapping):
        for cls, weight in class_weights.items():
            hits = values == cls
            table[hits] = weight
        return table
    raise TypeError(f"class_weights must be 'balanced', a dict or None, got {type(class_weights).__name__}")


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected an H x W label image, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"label image must be integer, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("label image has negative ids")
    return labels


def _check_params(w0: float, sigma: float, eps: float) -> None:
    if w0 < 0:
        raise ValueError(f"w0 must be >= 0, got {w0}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def _cutoff_radius(w0: float, sigma: float, eps: float) -> int:
    """Smallest integer R with w0 * exp(-R^2 / (2 sigma^2)) <= eps."""
    return math.ceil(sigma * math.sqrt(2.0 * max(math.log(w0 / eps), 0.0)))


def _compact_ids(labels: np.ndarray) -> np.ndarray:
    """Ids ``find_objects`` can index cheaply: as-is when small, else renumbered 1..K."""
    max_id = int(labels.max()) if labels.size else 0
    if max_id <= labels.size and labels.dtype in (np.int32, np.int64, np.intp):
        return labels
    if max_id <= labels.size:
        return labels.astype(np.int32)
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape).astype(np.int32)
    return inverse if ids[0] == 0 else inverse + 1
