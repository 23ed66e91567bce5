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

from kseg.core.errors import ConfigError

#: Per-pixel maps an instance target spec can name, one sigmoid channel each, written in the order
#: the spec names them ("mask+border" -> channel 0 mask, channel 1 border). The model builders
#: use the same spec for their head, so this is the one place the convention lives.
CHANNEL_NAMES = ("mask", "border", "center")
#: Semantic alternative: one channel holding the class index (softmax head, ``ce`` loss).
CLASSES = "classes"


def target_channels(targets: str) -> list[str]:
    """``"mask+border"`` -> ``["mask", "border"]``; ``"classes"`` -> ``["classes"]``."""
    if not isinstance(targets, str) or not targets.strip():
        raise ConfigError(f"targets must be a string such as 'mask+border', got {targets!r}")
    if targets.strip() == CLASSES:
        return [CLASSES]
    names = [t.strip() for t in targets.split("+")]
    unknown = [t for t in names if t not in CHANNEL_NAMES]
    if unknown:
        raise ConfigError(
            f"unknown target {unknown[0]!r} in {targets!r}; known targets: {', '.join(CHANNEL_NAMES)} "
            f"(join with '+', e.g. 'mask+border') or {CLASSES!r}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"targets {targets!r} names a channel twice")
    return names


def n_target_channels(targets: str) -> int:
    """How many channels the training target for ``targets`` has."""
    return len(target_channels(targets))


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
    names = target_channels(targets)
    if names == [CLASSES]:
        if is_instance:
            raise ConfigError("targets 'classes' needs a semantic (class-index) dataset, not instance labels")
        return target[..., None].astype(np.float32)
    if names != ["mask"] and not is_instance:
        raise ConfigError(f"targets {targets!r} needs instance labels; this dataset has class masks")
    maps = {"mask": lambda: target > 0,
            "border": lambda: instance_borders(target, border_width),
            "center": lambda: instance_centers(target)}
    return np.stack([maps[name]() for name in names], axis=-1).astype(np.float32)
