"""Paired folders: each image has a mask file with a matching name in a masks folder.

    TGS Salt      train/images/x.png  + train/masks/x.png
    Carvana       train/x.jpg         + train_masks/x_mask.gif    (mask_suffix="_mask")
    Nerve (UNS)   train/x.tif         + train/x_mask.tif          (same folder, mask_suffix="_mask")
    ISBI 2012     images/N.png        + masks/N.png               (255 = interior, 0 = membrane)

Masks are binary (0/255, 0/1 or a greyscale JPEG, thresholded to a uint8 0/1 class mask) or hold
class indices (``classes=K`` keeps values 0..K-1; ``classes=[v0, v1, ...]`` maps grey level v_k to
class k). ``instances=True`` turns a binary mask into connected-component instance labels.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from kseg.core.errors import ConfigError, DataError
from kseg.io.intensity import check_policy
from kseg.io.modality import check_modality
from kseg.io.sample import (
    Sample,
    check_same_size,
    list_images,
    preview,
    read_image,
    read_mask,
)


class PairedReader:
    """Images in ``images_dir``, masks in ``masks_dir`` (None: a test folder without masks).

    ``mask_suffix`` names a mask from its image's stem: ``"_mask"`` or a pattern such as
    ``"{stem}_mask"``; the mask's extension may differ from the image's (Carvana: .jpg + .gif).
    Sample ids are image stems.
    """

    def __init__(
        self,
        images_dir: str | Path,
        masks_dir: str | Path | None = None,
        mask_suffix: str | None = None,
        binary_threshold: int = 127,
        classes: int | Sequence[int] | None = None,
        instances: bool = False,
        intensity: str = "auto",
        modality: str = "keep",
    ):
        self.images_dir = Path(images_dir)
        self.intensity = check_policy(intensity)
        self.modality = check_modality(modality)
        self.masks_dir = None if masks_dir is None else Path(masks_dir)
        self.mask_suffix = mask_suffix or ""
        self.binary_threshold = int(binary_threshold)
        self.classes = classes if classes is None or isinstance(classes, int) else tuple(int(c) for c in classes)
        self.instances = bool(instances)
        if not 0 <= self.binary_threshold < 255:
            raise ConfigError(f"binary_threshold={binary_threshold} must be in 0..254 (masks are uint8)")
        if self.instances and self.classes is not None:
            raise ConfigError("instances=True labels the components of a binary mask; leave classes unset")
        if isinstance(self.classes, int) and not 2 <= self.classes <= 256:
            raise ConfigError(f"classes={classes} must be a class count in 2..256 (or a list of mask values)")
        if isinstance(self.classes, tuple) and (len(set(self.classes)) != len(self.classes) or
                                                not all(0 <= v <= 255 for v in self.classes)):
            raise ConfigError(f"classes={list(classes)} must list distinct mask values in 0..255")
        if "{stem}" not in self.mask_suffix and ("{" in self.mask_suffix or "}" in self.mask_suffix):
            raise ConfigError(f"mask_suffix={mask_suffix!r}: use a plain suffix ('_mask') or a '{{stem}}' pattern")

    @property
    def kind(self) -> str:
        return "instance" if self.instances else "semantic"

    @property
    def root(self) -> Path:
        return self.images_dir

    def __repr__(self) -> str:
        return f"PairedReader({str(self.images_dir)!r}, {str(self.masks_dir)!r}, mask_suffix={self.mask_suffix!r})"

    def mask_stem(self, stem: str) -> str:
        pattern = self.mask_suffix
        return pattern.replace("{stem}", stem) if "{stem}" in pattern else stem + pattern

    def _same_folder(self) -> bool:
        return self.masks_dir is not None and self.masks_dir.resolve() == self.images_dir.resolve()

    def _image_of_mask(self, mask_stem: str) -> str | None:
        """The image stem a mask stem belongs to, or None when it does not fit the pattern."""
        pattern = self.mask_suffix if "{stem}" in self.mask_suffix else "{stem}" + self.mask_suffix
        prefix, suffix = pattern.split("{stem}", 1)
        match = re.fullmatch(re.escape(prefix) + "(.+)" + re.escape(suffix), mask_stem)
        return match.group(1) if match else None

    def ids(self) -> list[str]:
        """Image stems, sorted. Every image must have a mask and every mask an image."""
        images = list_images(self.images_dir)
        stems = sorted(images.by_stem)
        if self._same_folder():
            if self.mask_stem("x") == "x":
                raise ConfigError(f"images and masks share {self.images_dir}: set mask_suffix (e.g. '_mask')")
            # Masks live beside their images (x.tif + x_mask.tif): a mask is not an image.
            stems = [s for s in stems if self._image_of_mask(s) is None]
        for stem in stems:
            images.stem_path(stem)  # raises on x.png + x.jpg
        if self.masks_dir is None:
            return stems
        masks = list_images(self.masks_dir)
        mask_stems = {self.mask_stem(s) for s in stems}
        lonely_images = [images.by_stem[s].name for s in stems if self.mask_stem(s) not in masks.by_stem]
        candidates = masks.by_stem
        if self._same_folder():
            candidates = {m: p for m, p in candidates.items() if self._image_of_mask(m) is not None}
        lonely_masks = [p.name for m, p in candidates.items() if m not in mask_stems]
        if lonely_images or lonely_masks:
            problems = []
            if lonely_images:
                problems.append(f"{len(lonely_images)} image(s) without a mask named "
                                f"{self.mask_stem('<stem>')}.<ext> in {self.masks_dir}: {preview(lonely_images)}")
            if lonely_masks:
                problems.append(f"{len(lonely_masks)} mask(s) without an image in {self.images_dir}: "
                                f"{preview(lonely_masks)}")
            hint = ("" if not lonely_images or self.mask_suffix
                    else " (masks named x_mask.gif? set mask_suffix='_mask')")
            raise DataError("; ".join(problems) + hint, self.images_dir)
        return stems

    def image_path(self, sample_id: str) -> Path:
        path = list_images(self.images_dir).stem_path(sample_id)
        if path is None:
            raise DataError(f"no image named {sample_id}.<png|jpg|gif|tif> in this folder", self.images_dir)
        return path

    def mask_path(self, sample_id: str) -> Path | None:
        """The mask of ``sample_id``; None for a test folder. Raises naming the image when missing."""
        if self.masks_dir is None:
            return None
        path = list_images(self.masks_dir).stem_path(self.mask_stem(sample_id))
        if path is None:
            raise DataError(
                f"image has no mask: expected {self.mask_stem(sample_id)}.<png|jpg|gif|tif> in {self.masks_dir}",
                self.image_path(sample_id),
            )
        return path

    def source_files(self, sample_id: str) -> list[Path]:
        files = []
        for find in (self.image_path, self.mask_path):
            try:
                path = find(sample_id)
            except DataError:
                continue
            if path is not None:
                files.append(path)
        return files

    def load(self, sample_id: str) -> Sample:
        image_path = self.image_path(sample_id)
        integrity: dict[str, dict] = {}
        image = read_image(image_path, self.intensity, integrity, self.modality)
        mask_path = self.mask_path(sample_id)
        if mask_path is None:
            return Sample(sample_id, image, path=str(image_path), integrity=integrity)
        raw = read_mask(mask_path)
        check_same_size(image, raw, mask_path)
        mask = self.to_classes(raw, mask_path)
        if self.instances:
            _, labels = cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_32S)
            return Sample(sample_id, image, labels=labels.astype(np.int32, copy=False), path=str(image_path),
                          integrity=integrity)
        return Sample(sample_id, image, mask=mask, path=str(image_path), integrity=integrity)

    def to_classes(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """The uint8 class-index mask of a raw mask file (see the module docstring)."""
        if self.classes is None:
            threshold = 0 if raw.max(initial=0) <= 1 else self.binary_threshold
            return (raw > threshold).view(np.uint8)
        if isinstance(self.classes, int):
            if raw.max(initial=0) >= self.classes:
                found = np.unique(raw)
                raise DataError(
                    f"mask values {preview(found[found >= self.classes].tolist())} are not classes 0.."
                    f"{self.classes - 1}" + (" (a 0/255 binary mask? leave classes unset)" if 255 in found else ""),
                    path,
                )
            return raw
        lookup = np.full(256, 255, np.uint8)
        lookup[list(self.classes)] = np.arange(len(self.classes), dtype=np.uint8)
        mask = lookup[raw]
        if len(self.classes) < 256 and (mask == 255).any():
            unknown = np.unique(raw[mask == 255])
            raise DataError(f"mask values {preview(unknown.tolist())} are not in classes={list(self.classes)}", path)
        return mask
