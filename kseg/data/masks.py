"""Binary-mask clean-up shared by every family's post-processing, and the classical baseline
(Otsu threshold + connected components) that every task reports beside its score.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import filters, measure, morphology, segmentation


def clean_mask(mask: np.ndarray, min_size: int = 0, fill_holes: bool = True) -> np.ndarray:
    """Fill holes inside objects and drop connected pieces smaller than ``min_size`` pixels."""
    mask = mask.astype(bool)
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if min_size > 0:
        mask = morphology.remove_small_objects(mask, max_size=min_size - 1)
    return mask


def remove_small_instances(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Zero instances smaller than ``min_size`` pixels, then renumber 1..K."""
    if min_size <= 0 or not labels.any():
        return labels.astype(np.int32)
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    out = np.where(small[labels], 0, labels)
    return segmentation.relabel_sequential(out)[0].astype(np.int32)


def otsu_baseline(image: np.ndarray, min_size: int = 8) -> np.ndarray:
    """The classical baseline: Otsu threshold on grey levels + connected components.

    Bright-field images (light background) are inverted first, judged by the median grey level.
    """
    grey = image.astype(np.float32).mean(axis=2) if image.ndim == 3 else image.astype(np.float32)
    if np.median(grey) > 127:
        grey = 255 - grey
    if grey.max() == grey.min():
        return np.zeros(grey.shape, np.int32)
    mask = clean_mask(grey > filters.threshold_otsu(grey), min_size=min_size)
    return measure.label(mask, connectivity=1).astype(np.int32)
