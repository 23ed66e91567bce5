"""Augmentation pipelines named in config, built from albumentations.

One ``Compose`` call moves the image, the label image / class mask (``mask``) and the weight map
(``weight``, an additional mask target) with the same random parameters, so they never drift
apart. Masks use nearest-neighbour interpolation; pixels that enter from outside the image (or
from padding) get label 0 and weight 0, so they add nothing to the loss.

A config names a preset (``augment.pipeline: microscopy``) or lists transforms explicitly::
    augment:
      pipeline:
        - {name: HorizontalFlip, p: 0.5}
        - {name: Affine, rotate: [-30, 30], p: 0.5}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np

from kseg.core.errors import ConfigError

ADDITIONAL_TARGETS = {"weight": "mask"}
SEEDINGS = ("independent", "shared")


class IndependentlySeeded(A.Compose):
    """A ``Compose`` whose ``set_random_seed`` gives every transform, nested ones too, a seed of its
    own drawn from ``SeedSequence(seed)``.

    albumentations 2.0 hands each transform the pipeline's own seed, so their random draws
    coincide: a horizontal and a vertical flip of p=0.5 fire together or not at all (only the
    180-degree turn is ever seen), and all the transforms of a preset fire on the same samples and
    are all off on the others. The batch classes seed the pipeline per sample, so this mattered on
    every sample of every run before ``augment.seeding`` existed.
    """

    def set_random_seed(self, seed: int | None) -> None:
        super().set_random_seed(seed)
        if seed is None:
            return
        nested = list(_nested_transforms(self))  # parents before their children, which they reseed
        for transform, state in zip(nested, np.random.SeedSequence(int(seed)).generate_state(len(nested))):
            transform.set_random_seed(int(state))


def _nested_transforms(pipeline: A.BaseCompose):
    for transform in pipeline.transforms:
        yield transform
        if isinstance(transform, A.BaseCompose):  # OneOf, SomeOf, Sequential (not a transform's own parts)
            yield from _nested_transforms(transform)


def compose(transforms: Sequence[A.BasicTransform], *, seeding: str = "independent", **kwargs) -> A.Compose:
    """``A.Compose(transforms, **kwargs)`` seeded as ``augment.seeding`` says: ``independent`` (each
    transform its own draw, :class:`IndependentlySeeded`) or ``shared`` (albumentations' own
    seeding, what runs trained before the option used)."""
    if seeding not in SEEDINGS:
        raise ConfigError(f"augment.seeding must be one of {', '.join(SEEDINGS)}, not {seeding!r}")
    return (IndependentlySeeded if seeding == "independent" else A.Compose)(list(transforms), **kwargs)


def _flips() -> list[A.BasicTransform]:
    return [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]


def _microscopy() -> list[A.BasicTransform]:
    """Nuclei / cells / EM: orientation-free, scale varies, stains and focus vary."""
    return _flips() + [
        A.Affine(scale=(0.8, 1.25), translate_percent=(-0.0625, 0.0625), rotate=(-45, 45),
                 border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        A.ElasticTransform(alpha=20, sigma=5, border_mode=cv2.BORDER_REFLECT_101, p=0.15),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.RandomGamma(gamma_limit=(80, 120), p=0.3),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5), p=1.0), A.GaussNoise(std_range=(0.01, 0.05), p=1.0)], p=0.3),
    ]


def _natural() -> list[A.BasicTransform]:
    """Photographs and seismic/satellite tiles: horizontal flips, mild scale, colour."""
    return [
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10),
                 border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        A.RandomBrightnessContrast(p=0.5),
    ]


def _microscopy_colour() -> list[A.BasicTransform]:
    """``microscopy`` plus what differs between labs, stains and cameras, so a score holds on image
    types the training set has few of. Colour transforms move the image only: masks and weights
    are untouched. (``microscopy`` already varies gamma, brightness and contrast.)"""
    return _microscopy() + [
        # Stain batches and scanners shift hue and saturation (H&E from purple to pink); brightness
        # and contrast jitter mimic exposure. ColorJitter also runs silently on one-channel images.
        A.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.3, hue=0.05, p=0.4),
        # Colour is no reliable cue for a nucleus: a share of grey pictures keeps the model from
        # leaning on it (a one-channel image stays as it is; albumentations warns about that once).
        A.ToGray(p=0.15),
        # Uneven illumination and low-contrast exposures: local histogram equalisation.
        A.CLAHE(clip_limit=(1, 3), tile_grid_size=(8, 8), p=0.15),
    ]


def _microscopy_mixed() -> list[A.BasicTransform]:
    """``microscopy_colour`` plus inversion, for one model over fluorescence (objects bright) and
    bright-field or stained images (objects dark) read as they are (``preprocess.modality: keep``):
    an inverted fluorescence image looks like a bright-field one and vice versa. With
    ``preprocess.modality: fluorescence`` every image is already light on dark: use
    ``microscopy_colour`` there."""
    return _microscopy_colour() + [A.InvertImg(p=0.2)]


PRESETS = {
    "none": lambda: [],
    "flips": _flips,
    "microscopy": _microscopy,
    "natural": _natural,
    "microscopy_colour": _microscopy_colour,
    "microscopy_mixed": _microscopy_mixed,
}


def _from_spec(spec: Mapping[str, Any]) -> A.BasicTransform:
    params = dict(spec)
    name = params.pop("name", None)
    transform = getattr(A, str(name), None) if name else None
    if transform is None or not isinstance(transform, type):
        raise ConfigError(f"augment: {name!r} is not an albumentations transform (e.g. HorizontalFlip, Affine)")
    if "transforms" in params:  # OneOf / SomeOf / Sequential
        params["transforms"] = [_from_spec(child) for child in params["transforms"]]
    params = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in params.items()}
    try:
        return transform(**params)
    except Exception as exc:
        raise ConfigError(f"augment: cannot build {name} with {params}: {exc}") from exc


def build_augmentation(
    pipeline: str | Sequence[Mapping[str, Any]] | None = "microscopy",
    crop_size: tuple[int, int] | None = None,
    seed: int | None = None,
    seeding: str = "independent",
) -> A.Compose:
    """A ``Compose`` with the weight map as an extra mask target.

    With ``crop_size`` the pipeline starts with a random crop (padding with zeros, weight 0, when
    the image is smaller), so later transforms work on the small training window, not the whole
    image.
    """
    if pipeline is None or isinstance(pipeline, str):
        name = pipeline or "none"
        if name not in PRESETS:
            raise ConfigError(f"augment.pipeline {name!r} is not a preset ({', '.join(PRESETS)}) or a list")
        transforms = PRESETS[name]()
    else:
        transforms = [_from_spec(spec) for spec in pipeline]
    if crop_size is not None:
        height, width = crop_size
        # A square window keeps RandomRotate90 shape-preserving; a centre crop then gives the size.
        side = max(height, width)
        crop = A.RandomCrop(side, side, pad_if_needed=True, border_mode=cv2.BORDER_CONSTANT,
                            fill=0, fill_mask=0, p=1.0)
        transforms = [crop, *transforms]
        if height != width:
            transforms.append(A.CenterCrop(height, width, p=1.0))
    return compose(transforms, seeding=seeding, additional_targets=dict(ADDITIONAL_TARGETS), seed=seed)
