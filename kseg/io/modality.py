"""Image groups (fluorescence, bright-field, stained) and the option that makes them all look alike.

Nuclei datasets such as the 2018 Data Science Bowl mix three kinds of picture: fluorescence
(bright nuclei on a black background), bright-field (dark objects on a light grey background)
and stained tissue (purple / pink H&E sections on a light background). A model trained mostly on
the first kind scores poorly on the others, so a score that should hold for unseen image types
needs (a) the group of every image, to report scores per group and to split by it, and (b) an
input option that removes the largest difference between the groups: which of object and
background is the bright one.

``preprocess.modality`` picks the option; training, ``submit`` and ``predict`` apply the one stored
in the run's ``config.yaml``, at the same place as ``preprocess.intensity`` (when an image is
decoded), so a test image is converted exactly as the training images were.

- ``keep`` (default): images as decoded, the behaviour of runs made before this key existed.
- ``fluorescence``: every image becomes one grey channel with bright objects on a dark
  background (:func:`as_fluorescence`); ``preprocess.channels`` then repeats it to the channel
  count the model is built with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import cv2
import numpy as np

from kseg.core.errors import ConfigError

GROUPS = ("fluorescence", "brightfield", "stained")
MODALITIES = ("keep", "fluorescence")
# The rule of image_group (see its docstring). On the 111 images of the DSB 2018 stage-1 sample
# the medians are 1..44 (fluorescence) and 137..230 (the others), and the coloured share is 0 for
# the grey bright-field images and 0.12..1 for the stained ones, so the cuts sit in wide gaps.
DARK_BACKGROUND = 90  # median brightness (0..255) below this: a dark background
COLOUR_CHROMA = 32  # a pixel whose channels spread by at least this much is coloured
COLOURED_SHARE = 0.05  # at least this share of coloured pixels: a stained image
# What preprocess.modality=fluorescence did to an image, as the once-per-dataset warning words it.
MODALITY_KINDS = {
    "images_brightfield_inverted": "bright-field image(s) inverted to bright objects on a dark background "
                                   "(preprocess.modality=fluorescence)",
    "images_stained_inverted": "stained image(s) made grey and inverted to bright objects on a dark background "
                               "(preprocess.modality=fluorescence)",
}

Note = Callable[[str, str], None]  # (kind, example) -> None


def check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise ConfigError(f"preprocess.modality {modality!r} is not one of {', '.join(MODALITIES)}")
    return modality


def _channels(image: np.ndarray) -> np.ndarray:
    """The image as H x W x C with C = 1 or 3 (alpha dropped); a ValueError for anything else."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype} (decode it with kseg.io.sample.read_image)")
    if image.ndim == 2:
        return image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or 0 in image.shape:
        raise ValueError(f"expected an H x W, H x W x 1, 3 or 4 image, got shape {image.shape}")
    return image[..., :3]


def _brightness_and_colour(image: np.ndarray) -> tuple[float, float]:
    """(median of the per-pixel channel mean, share of pixels whose channels spread by at least
    ``COLOUR_CHROMA``) of an H x W x C uint8 image (C = 1 or 3)."""
    total = image.sum(axis=2, dtype=np.uint16)  # channel sum: the mean times C, exactly
    brightness = float(np.median(total)) / image.shape[2]
    if image.shape[2] == 1:
        return brightness, 0.0
    spread = image.max(axis=2) - image.min(axis=2)  # max >= min: no uint8 wrap-around
    return brightness, float(np.count_nonzero(spread >= COLOUR_CHROMA)) / spread.size


def image_group(image: np.ndarray) -> str:
    """One of :data:`GROUPS` for a uint8 image (H x W, H x W x 1, 3 or 4; RGBA's alpha ignored).

    The background fills most of a microscopy image, so the median brightness (of the per-pixel
    mean of the channels) is the background's:

    1. median below ``DARK_BACKGROUND`` (90): ``fluorescence``, coloured or not (dyes are
       coloured: a blue DAPI or green GFP image is still light on dark);
    2. else at least ``COLOURED_SHARE`` (5 %) of the pixels coloured, i.e. with their largest and
       smallest channel ``COLOUR_CHROMA`` (32) or more apart: ``stained`` (H&E and similar
       stains colour the nuclei, often the tissue around them too; a grey camera's noise or
       white balance stays well below that spread);
    3. else ``brightfield`` (grey, light background, darker objects).

    A stained section darker than the cut (median below 90) reads as fluorescence.
    """
    brightness, coloured = _brightness_and_colour(_channels(image))
    if brightness < DARK_BACKGROUND:
        return "fluorescence"
    return "stained" if coloured >= COLOURED_SHARE else "brightfield"


def decoded_group(image: np.ndarray, notes: Mapping[str, object] | None = None) -> str:
    """The group of an image as it was decoded, before ``preprocess.modality`` converted it: the
    reader's note of the inversion (``images_<group>_inverted`` in ``Sample.integrity`` or a cache
    file's notes) names it, since a converted image reads as fluorescence; else
    :func:`image_group` of the image."""
    for group in GROUPS:
        if f"images_{group}_inverted" in (notes or {}):
            return group
    return image_group(image)


def group_counts(images: Iterable[np.ndarray]) -> dict[str, int]:
    """``{group: number of images}`` over every group of :data:`GROUPS` (0 for an absent one)."""
    counts = dict.fromkeys(GROUPS, 0)
    for image in images:
        counts[image_group(image)] += 1
    return counts


def as_fluorescence(image: np.ndarray, group: str | None = None) -> np.ndarray:
    """The image as uint8 H x W x 1, bright objects on a dark background whatever its group.

    Fluorescence keeps, per pixel, its brightest channel (a one-dye image stored in one colour
    channel keeps its full range, which luma would cut to a tenth for blue); bright-field and
    stained images become luma (ITU-R BT.601, OpenCV's RGB -> grey) inverted, so dark nuclei on a
    light background become bright nuclei on a dark one. One channel is returned so that
    ``preprocess.channels`` alone decides what the model sees (grey repeated to 3 channels, or
    kept as 1), as for any grey image read from disk. ``group`` skips :func:`image_group` when
    the caller already knows it.
    """
    rgb = _channels(image)
    group = image_group(rgb) if group is None else group
    if group not in GROUPS:
        raise ValueError(f"group {group!r} is not one of {', '.join(GROUPS)}")
    if rgb.shape[2] == 1:
        grey = rgb[..., 0]
    elif group == "fluorescence":
        grey = rgb.max(axis=2)
    else:
        grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    if group != "fluorescence":
        grey = np.uint8(255) - grey
    return np.ascontiguousarray(grey)[..., None]


def to_modality(image: np.ndarray, modality: str, path: str | Path, note: Note | None = None) -> np.ndarray:
    """A decoded uint8 image (RGB order) under ``preprocess.modality``; ``note(kind, example)``
    hears each image that was inverted. ``keep`` returns the very same array."""
    check_modality(modality)
    if modality == "keep":
        return image
    group = image_group(image)
    if note and group != "fluorescence":
        note(f"images_{group}_inverted", Path(path).name)
    return as_fluorescence(image, group)
