"""Training targets derived from a label image or class mask, after augmentation.

Instance datasets train on channels computed from the (augmented) label image:

- ``mask``: foreground;
- ``mask+border``: foreground + each instance's inner contour, the DSB 2018 winners' recipe: the
  border channel tells touching nuclei apart and seeds a watershed at prediction time;
- ``mask+center``: foreground + each instance's core (pixels at least half the instance's maximum
  distance from its own edge), markers for a watershed.

Semantic datasets use ``mask`` (any class > 0) or ``classes`` (the class index, for softmax).
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from kseg.errors import ConfigError

TARGETS = {"mask": 1, "mask+border": 2, "mask+center": 2, "classes": 1}


def n_target_channels(targets: str) -> int:
    """How many output channels a model needs for ``targets``."""
    if targets not in TARGETS:
        raise ConfigError(f"targets {targets!r} is not one of {sorted(TARGETS)}")
    return TARGETS[targets]


def instance_borders(labels: np.ndarray, width: int = 2) -> np.ndarray:
    """Instance pixels within ``width`` px of another label (background or another instance)."""
    if not labels.any():
        return np.zeros(labels.shape, bool)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    as_float = labels.astype(np.float32)  # exact for ids < 2**24; cv2 morphology has no int32
    highest = cv2.dilate(as_float, kernel, borderType=cv2.BORDER_REPLICATE)
    lowest = cv2.erode(as_float, kernel, borderType=cv2.BORDER_REPLICATE)
    return (labels > 0) & (highest != lowest)


def instance_centers(labels: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """Pixels at least ``fraction`` of their instance's largest inner distance from its edge."""
    if not labels.any():
        return np.zeros(labels.shape, bool)
    inside = (labels > 0) & ~instance_borders(labels, width=1)
    distance = ndimage.distance_transform_edt(inside)
    ids = np.arange(labels.max() + 1)
    largest = np.zeros(ids.size)
    largest[1:] = ndimage.maximum(distance, labels, ids[1:])
    return (labels > 0) & (distance >= fraction * largest[labels]) & (distance > 0)


def make_targets(target: np.ndarray, targets: str, is_instance: bool, border_width: int = 2) -> np.ndarray:
    """float32 H x W x C training target for one (augmented) sample."""
    n_target_channels(targets)
    if targets == "classes":
        if is_instance:
            raise ConfigError("targets 'classes' needs a semantic (class-index) dataset, not instance labels")
        return target[..., None].astype(np.float32)
    foreground = target > 0
    if targets == "mask":
        return foreground[..., None].astype(np.float32)
    if not is_instance:
        raise ConfigError(f"targets {targets!r} needs instance labels; this dataset has class masks")
    extra = instance_borders(target, border_width) if targets == "mask+border" else instance_centers(target)
    return np.stack([foreground, extra], axis=-1).astype(np.float32)
