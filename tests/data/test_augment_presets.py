"""The colour / stain presets: built from the ``microscopy`` preset, image, label image and weight map
moved together, uint8 images of the same shape out, colour changed on the image alone."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
from scipy import ndimage

from kseg.core import schema
from kseg.data.augment import ADDITIONAL_TARGETS, PRESETS, build_augmentation

COLOUR_PRESETS = ("microscopy_colour", "microscopy_mixed")
SEEDS = range(40)
SIZE = 64
MARK = (slice(24, 32), slice(20, 28))  # an 8 x 8 block off the centre: rotations and flips move it


def marked_sample() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A purple picture with one bright block; label 7 and weight 5 on the same block."""
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = (60, 30, 90)
    image[MARK] = (220, 200, 240)
    labels = np.zeros((SIZE, SIZE), np.int32)
    labels[MARK] = 7
    weight = np.ones((SIZE, SIZE), np.float32)
    weight[MARK] = 5.0
    return image, labels, weight


def image_marker(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Pixels of the picture (``valid``: not crop padding) that stand out from its median by more
    than half the largest gap, whether the block stayed bright or was inverted to dark."""
    grey = image.astype(np.float64).mean(axis=2)
    gap = np.where(valid, np.abs(grey - np.median(grey[valid])), 0.0)
    standing_out, count = ndimage.label(gap > gap.max() / 2)
    if count <= 1:
        return standing_out > 0
    # Noise can lift a few background pixels over the cut: the block is the largest piece.
    return standing_out == 1 + np.argmax(np.bincount(standing_out.ravel())[1:])


def names(transforms) -> list[str]:
    return [type(t).__name__ for t in transforms]


def test_presets_are_the_microscopy_preset_plus_colour_transforms():
    assert set(COLOUR_PRESETS) <= set(PRESETS) and tuple(PRESETS) == schema.AUGMENT_PRESETS
    microscopy = [repr(t) for t in PRESETS["microscopy"]()]
    colour, mixed = PRESETS["microscopy_colour"](), PRESETS["microscopy_mixed"]()
    assert [repr(t) for t in colour[: len(microscopy)]] == microscopy
    assert names(colour[len(microscopy):]) == ["ColorJitter", "ToGray", "CLAHE"]
    assert [repr(t) for t in mixed[:-1]] == [repr(t) for t in colour] and names(mixed[-1:]) == ["InvertImg"]
    assert all(0 < t.p < 0.5 for t in mixed[len(microscopy):])  # moderate: most samples keep their colours


@pytest.mark.parametrize("name", COLOUR_PRESETS)
@pytest.mark.parametrize("crop_size, shape", [(None, (SIZE, SIZE)), ((32, 48), (32, 48)), ((96, 96), (96, 96))])
def test_image_labels_and_weights_move_together(name, crop_size, shape):
    image, labels, weight = marked_sample()
    augment = build_augmentation(name, crop_size=crop_size, seed=0)
    seen = 0
    for seed in SEEDS:
        augment.set_random_seed(seed)
        out = augment(image=image, mask=labels, weight=weight)
        assert out["image"].dtype == np.uint8 and out["image"].shape == (*shape, 3)
        assert out["mask"].dtype == np.int32 and out["mask"].shape == shape
        assert out["weight"].dtype == np.float32 and out["weight"].shape == shape
        assert set(np.unique(out["mask"])) <= {0, 7}  # nearest neighbour: no label is blended
        marked = out["mask"] == 7
        np.testing.assert_array_equal(out["weight"] == 5.0, marked)  # the weight map follows pixel for pixel
        if marked.sum() < 16:  # cropped out (or nearly): nothing to compare the image with
            continue
        seen += 1
        found = image_marker(out["image"], out["weight"] > 0)  # padding carries weight 0
        assert np.abs(np.argwhere(found).mean(axis=0) - np.argwhere(marked).mean(axis=0)).max() < 1.0, seed
        assert (found & marked).sum() / (found | marked).sum() > 0.8, seed
    assert seen >= len(SEEDS) // 2


@pytest.mark.parametrize("name", COLOUR_PRESETS)
def test_colour_transforms_change_the_image_alone(name):
    colour = [t for t in PRESETS[name]() if isinstance(t, A.ImageOnlyTransform)]
    assert {"ColorJitter", "ToGray", "CLAHE"} <= set(names(colour))
    augment = A.Compose(colour, additional_targets=dict(ADDITIONAL_TARGETS), seed=0)
    image, labels, weight = marked_sample()
    changed = 0
    for seed in SEEDS:
        augment.set_random_seed(seed)
        out = augment(image=image, mask=labels, weight=weight)
        np.testing.assert_array_equal(out["mask"], labels)
        np.testing.assert_array_equal(out["weight"], weight)
        assert out["image"].dtype == np.uint8 and out["image"].shape == image.shape
        changed += not np.array_equal(out["image"], image)
    assert 0 < changed < len(SEEDS)  # applied at moderate rates: some images changed, some kept


@pytest.mark.parametrize("name, inverts", [("microscopy_colour", False), ("microscopy_mixed", True)])
def test_seeded_outputs_include_grey_and_inverted_pictures(name, inverts):
    image, labels, weight = marked_sample()
    augment = build_augmentation(name, seed=0)
    grey = inverted = 0
    for seed in SEEDS:
        augment.set_random_seed(seed)
        out = augment(image=image, mask=labels, weight=weight)
        pixels = out["image"].astype(np.int16)
        grey += int((pixels.max(axis=2) - pixels.min(axis=2)).max() <= 2)  # ToGray (CLAHE may round by 1)
        marked = out["mask"] == 7
        if marked.any():
            inverted += int(pixels[marked].mean() < pixels[~marked].mean())
    assert 0 < grey < len(SEEDS)
    assert (inverted > 0) == inverts
    # The same seed gives the same picture (training is reproducible).
    augment.set_random_seed(3)
    first = augment(image=image, mask=labels, weight=weight)["image"]
    augment.set_random_seed(3)
    np.testing.assert_array_equal(augment(image=image, mask=labels, weight=weight)["image"], first)


@pytest.mark.filterwarnings("ignore:The image is already gray")  # ToGray's note, once per process in training
@pytest.mark.parametrize("name", COLOUR_PRESETS)
def test_one_channel_images_keep_one_channel(name):
    """``preprocess.channels: 1`` feeds H x W x 1 images: the colour transforms must keep them so."""
    image, labels, weight = marked_sample()
    grey = image[..., :1].copy()
    augment = build_augmentation(name, crop_size=(32, 32), seed=0)
    for seed in range(10):
        augment.set_random_seed(seed)
        out = augment(image=grey, mask=labels, weight=weight)
        assert out["image"].dtype == np.uint8 and out["image"].shape == (32, 32, 1)
