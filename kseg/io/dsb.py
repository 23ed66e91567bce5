"""The 2018 Data Science Bowl folder layout: one folder per image, one PNG per instance.

    stage1_train/<id>/images/<id>.png      RGBA image (alpha dropped)
    stage1_train/<id>/masks/<mask>.png     0/255 mask of one nucleus, one file per nucleus

The masks of a sample are merged into one int32 label image; instance k is the k-th mask file in
sorted name order. Test folders (no ``masks`` folder) give samples without labels.

Overlapping masks are an error by default. The public stage-1 masks still hold a few overlaps of
a pixel or two; ``overlap="first"`` gives such pixels to the earlier mask instead.

What is read without an error but not as the files say is noted in ``Sample.integrity``: an
empty ``masks`` folder read as a sample without objects (``empty_mask_folders``) and each mask
whose overlap ``overlap="first"`` resolved, with the pixels left to the earlier mask
(``overlaps_resolved_first``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kseg.core.errors import ConfigError, DataError
from kseg.io.intensity import check_policy
from kseg.io.modality import check_modality
from kseg.io.sample import (
    Sample,
    check_same_size,
    is_image_file,
    is_listed,
    note,
    preview,
    read_image,
    read_mask,
)

OVERLAP = ("error", "first")


class DsbReader:
    """Reads ``root_dir/<id>/images/<id>.png`` plus ``root_dir/<id>/masks/*.png``.

    Holds only the folder path, so it pickles cheaply into joblib workers; ``ids()`` lists folder
    names without decoding anything.
    """

    kind = "instance"

    def __init__(self, root_dir: str | Path, overlap: str = "error", intensity: str = "auto",
                 modality: str = "keep"):
        if overlap not in OVERLAP:
            raise ConfigError(f"overlap={overlap!r} must be one of {OVERLAP}")
        self.root = Path(root_dir)
        self.overlap = overlap
        self.intensity = check_policy(intensity)
        self.modality = check_modality(modality)

    def __repr__(self) -> str:
        return f"DsbReader({str(self.root)!r})"

    def ids(self) -> list[str]:
        """Sample folder names, sorted. Raises when ``root`` is not a DSB-style folder."""
        if not self.root.is_dir():
            raise DataError("dataset folder does not exist (expected e.g. stage1_train)", self.root)
        with os.scandir(self.root) as entries:
            ids = sorted(e.name for e in entries if is_listed(e.name) and e.is_dir())
        if ids and not any((self.root / i / "images").is_dir() for i in ids):
            raise DataError(
                f"no <id>/images folders under this folder (found folders {preview(ids, 3)}); "
                "pass the folder that holds the sample folders, e.g. .../stage1_train",
                self.root,
            )
        return ids

    def image_path(self, sample_id: str) -> Path:
        """``<id>/images/<id>.png``, or the single image in ``images/`` if it is named otherwise."""
        images_dir = self.root / sample_id / "images"
        expected = images_dir / f"{sample_id}.png"
        if expected.is_file():
            return expected
        if not images_dir.is_dir():
            if not (self.root / sample_id).is_dir():
                raise DataError(f"no sample folder {sample_id!r} in {self.root}", self.root / sample_id)
            raise DataError(f"sample has no images folder (expected {sample_id}/images/{sample_id}.png)",
                            images_dir)
        found = sorted(n for n in os.listdir(images_dir) if is_image_file(n))
        if len(found) == 1:
            return images_dir / found[0]
        listing = preview(found) if found else "no image files"
        raise DataError(f"expected {sample_id}.png or a single image in this folder, found {listing}", images_dir)

    def mask_paths(self, sample_id: str) -> list[Path] | None:
        """Sorted mask files, or None for a test sample (no ``masks`` folder)."""
        masks_dir = self.root / sample_id / "masks"
        if not masks_dir.is_dir():
            return None
        return [masks_dir / n for n in sorted(os.listdir(masks_dir)) if is_image_file(n)]

    def source_files(self, sample_id: str) -> list[Path]:
        """Image and mask files of a sample (cache keys); never raises, missing files included."""
        try:
            image = self.image_path(sample_id)
        except DataError:
            image = self.root / sample_id / "images" / f"{sample_id}.png"
        return [image, *(self.mask_paths(sample_id) or [])]

    def load(self, sample_id: str) -> Sample:
        image_path = self.image_path(sample_id)
        integrity: dict[str, dict] = {}
        image = read_image(image_path, self.intensity, integrity, self.modality)
        mask_paths = self.mask_paths(sample_id)
        labels = None
        if mask_paths is not None:
            if not mask_paths:
                note(integrity, "empty_mask_folders", f"{sample_id}/masks")
            labels = merge_instance_masks(mask_paths, image, self.overlap, integrity)
        return Sample(sample_id, image, labels=labels, path=str(image_path), integrity=integrity)


def merge_instance_masks(mask_paths: list[Path], image: np.ndarray, overlap: str = "error",
                         integrity: dict[str, dict] | None = None) -> np.ndarray:
    """One int32 label image from one-instance mask files (file k -> label k, from 1).

    The label image doubles as the occupancy counter: a mask landing on pixels already labelled
    is an overlap, and the labels found there name the earlier file, so no pairwise comparison
    of masks is needed. ``overlap="first"`` leaves such pixels to the earlier mask and, given an
    ``integrity`` mapping (``Sample.integrity``), notes each such mask with its pixel count.
    """
    height, width = image.shape[:2]
    labels = np.zeros(height * width, np.int32)
    for label, path in enumerate(mask_paths, start=1):
        mask = read_mask(path)
        check_same_size(image, mask, path)
        pixels = np.flatnonzero(mask)
        if pixels.size == 0:
            raise DataError("instance mask is empty (no foreground pixel); delete the file or fix it", path)
        earlier = labels[pixels]
        if earlier.any():
            clash = earlier[earlier > 0]
            other = mask_paths[int(np.bincount(clash).argmax()) - 1]
            if overlap == "error":
                raise DataError(
                    f"instance mask overlaps {other.name} on {clash.size} pixel(s); instances must not "
                    "overlap (fix or drop one of the two files, or pass overlap='first')",
                    path,
                )
            pixels = pixels[earlier == 0]
            if pixels.size == 0:
                raise DataError(f"instance mask lies entirely inside {other.name}; drop one of the two", path)
            if integrity is not None:
                name = "/".join(path.parts[-3:])  # <id>/masks/<file>
                owners = len(np.unique(clash))
                others = f" and {owners - 1} other mask(s)" if owners > 1 else ""
                note(integrity, "overlaps_resolved_first", f"{name} ({clash.size} px to {other.name}{others})",
                     pixels=clash.size)
        labels[pixels] = label
    return labels.reshape(height, width)
