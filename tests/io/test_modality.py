"""Image groups and ``preprocess.modality``: synthetic pictures of each group with hand-known
answers, the option at every place images are decoded (readers, cache, submit / predict), and
the groups of the real DSB 2018 sample as checked by eye."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from fixtures_datasets import imwrite

from kseg.core import schema
from kseg.core.config import load_config
from kseg.core.errors import ConfigError
from kseg.core.runs import run_config
from kseg.data.preprocess import PreprocessSettings, cache_key, preprocess
from kseg.io import modality
from kseg.io.dsb import DsbReader
from kseg.io.modality import (
    GROUPS,
    as_fluorescence,
    decoded_group,
    group_counts,
    image_group,
    to_modality,
)
from kseg.io.readers import open_dataset
from kseg.io.sample import ImageDecoder, read_image

SHAPE = (40, 50)


def discs(background, foreground, shape=SHAPE, channels=3) -> np.ndarray:
    """A uint8 picture of ``background`` with three discs of ``foreground`` (values per channel),
    the discs covering about 20 % of it."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside = np.zeros(shape, bool)
    for cy, cx in ((12, 12), (26, 30), (12, 40)):
        inside |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
    image = np.empty((*shape, channels), np.uint8)
    image[:] = np.asarray(background, np.uint8)
    image[inside] = np.asarray(foreground, np.uint8)
    return image


def inside_discs(shape=SHAPE) -> np.ndarray:
    return discs(0, 1, shape, channels=1)[..., 0].astype(bool)


FLUORESCENCE = discs(10, 200)  # grey nuclei on black, stored as 3 identical channels
BRIGHTFIELD = discs(210, 80)  # dark grey objects on a light grey background
STAINED = discs((235, 235, 240), (120, 60, 160))  # purple nuclei on white (H&E-like)


def luma(rgb) -> np.ndarray:
    """ITU-R BT.601 luma, rounded: what an RGB -> grey conversion gives (the values used stay
    far from .5, so fixed-point rounding cannot differ)."""
    rgb = np.asarray(rgb, np.float64)
    return np.rint(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.uint8)


# --- image_group on pictures with known answers ------------------------------------------------


@pytest.mark.parametrize("image, group", [
    (FLUORESCENCE, "fluorescence"),
    (FLUORESCENCE[..., :1], "fluorescence"),
    (FLUORESCENCE[..., 0], "fluorescence"),  # 2-D
    (discs(5, (0, 0, 180)), "fluorescence"),  # a blue (DAPI-like) dye: coloured, still light on dark
    (discs(5, (0, 200, 0)), "fluorescence"),  # green (GFP-like)
    (BRIGHTFIELD, "brightfield"),
    (BRIGHTFIELD[..., 0], "brightfield"),  # 2-D
    (discs((212, 210, 208), (82, 80, 78)), "brightfield"),  # a camera's slight tint is not a stain
    (STAINED, "stained"),
    (discs((230, 160, 200), (110, 50, 150)), "stained"),  # pink tissue everywhere, purple nuclei
])
def test_each_kind_of_picture_gets_its_group(image, group):
    assert image_group(image) == group


def test_rgba_alpha_is_ignored():
    transparent = np.concatenate([BRIGHTFIELD, np.zeros((*SHAPE, 1), np.uint8)], axis=2)
    assert image_group(transparent) == "brightfield"  # with alpha as a 4th channel every pixel would spread by 210
    noisy_alpha = np.random.default_rng(0).integers(0, 256, (*SHAPE, 1), dtype=np.uint8)
    assert image_group(np.concatenate([FLUORESCENCE, noisy_alpha], axis=2)) == "fluorescence"
    assert image_group(np.concatenate([STAINED, noisy_alpha], axis=2)) == "stained"
    np.testing.assert_array_equal(as_fluorescence(np.concatenate([BRIGHTFIELD, noisy_alpha], axis=2)),
                                  as_fluorescence(BRIGHTFIELD))


def test_the_brightness_cut_is_at_the_median():
    # 60 % of the pixels at the level, 40 % white: the median is the level.
    image = np.full((10, 10, 3), 255, np.uint8)
    image[:6] = modality.DARK_BACKGROUND - 1
    assert image_group(image) == "fluorescence"
    image[:6] = modality.DARK_BACKGROUND
    assert image_group(image) == "brightfield"


def test_the_colour_cut_counts_pixels_whose_channels_spread_by_the_threshold():
    image = np.full((20, 20, 3), 220, np.uint8)  # 400 pixels; 5 % = 20 pixels
    coloured = image.reshape(-1, 3)
    coloured[:19] = (220, 220 - modality.COLOUR_CHROMA, 220)  # 19 coloured pixels: 4.75 %
    assert image_group(image) == "brightfield"
    coloured[19] = (220, 220 - modality.COLOUR_CHROMA, 220)  # 20: 5 %
    assert image_group(image) == "stained"
    coloured[:20] = (220, 220 - modality.COLOUR_CHROMA + 1, 220)  # a spread just under the threshold
    assert image_group(image) == "brightfield"


def test_group_counts_lists_every_group():
    assert group_counts([FLUORESCENCE, STAINED, FLUORESCENCE[..., 0]]) == {"fluorescence": 2, "brightfield": 0,
                                                                           "stained": 1}
    assert group_counts([]) == dict.fromkeys(GROUPS, 0)


@pytest.mark.parametrize("image, message", [
    (FLUORESCENCE.astype(np.uint16), "expected a uint8 image, got uint16"),
    (FLUORESCENCE[..., :2], r"expected an H x W, H x W x 1, 3 or 4 image, got shape \(40, 50, 2\)"),
    (np.zeros((0, 5, 3), np.uint8), r"got shape \(0, 5, 3\)"),
])
def test_what_is_not_a_uint8_picture_is_refused(image, message):
    with pytest.raises(ValueError, match=message):
        image_group(image)


# --- as_fluorescence -----------------------------------------------------------------------------


def test_brightfield_is_inverted_to_bright_objects_on_dark():
    got = as_fluorescence(BRIGHTFIELD)
    assert got.dtype == np.uint8 and got.shape == (*SHAPE, 1)
    inside = inside_discs()
    assert set(np.unique(got[inside])) == {255 - 80} and set(np.unique(got[~inside])) == {255 - 210}
    np.testing.assert_array_equal(as_fluorescence(BRIGHTFIELD[..., 0]), got)  # 2-D: the same, H x W x 1


def test_stained_becomes_inverted_luma():
    got = as_fluorescence(STAINED)[..., 0]
    inside = inside_discs()
    nucleus, background = 255 - luma([120, 60, 160]), 255 - luma([235, 235, 240])
    assert (nucleus, background) == (166, 19)  # by hand: 255 - rint(89.34), 255 - rint(235.57)
    assert set(np.unique(got[inside])) == {nucleus} and set(np.unique(got[~inside])) == {background}


def test_fluorescence_is_kept_as_its_brightest_channel():
    got = as_fluorescence(FLUORESCENCE)
    assert got.shape == (*SHAPE, 1)
    np.testing.assert_array_equal(got[..., 0], FLUORESCENCE[..., 0])  # grey in 3 channels: the values as they are
    blue = discs(5, (0, 0, 180))
    np.testing.assert_array_equal(as_fluorescence(blue)[..., 0], blue[..., 2])  # luma would leave 21 of 180


def test_a_known_group_is_used_as_given():
    np.testing.assert_array_equal(as_fluorescence(FLUORESCENCE, "brightfield")[..., 0], 255 - FLUORESCENCE[..., 0])
    with pytest.raises(ValueError, match="group 'phase' is not one of fluorescence, brightfield, stained"):
        as_fluorescence(FLUORESCENCE, "phase")


def test_keep_returns_the_very_same_array_and_fluorescence_notes_what_it_inverted():
    heard = []
    assert to_modality(BRIGHTFIELD, "keep", "a.png", lambda *n: heard.append(n)) is BRIGHTFIELD
    assert heard == []
    to_modality(FLUORESCENCE, "fluorescence", "dir/f.png", lambda *n: heard.append(n))
    to_modality(STAINED, "fluorescence", "dir/s.png", lambda *n: heard.append(n))
    to_modality(BRIGHTFIELD, "fluorescence", "dir/b.png", lambda *n: heard.append(n))
    assert heard == [("images_stained_inverted", "s.png"), ("images_brightfield_inverted", "b.png")]
    with pytest.raises(ConfigError, match="preprocess.modality 'fluo' is not one of keep, fluorescence"):
        to_modality(BRIGHTFIELD, "fluo", "a.png")


# --- where images are decoded: files, readers, the cache ----------------------------------------


def test_read_image_applies_the_option_and_keeps_files_as_read_by_default(tmp_path):
    rgba = np.concatenate([BRIGHTFIELD, np.full((*SHAPE, 1), 255, np.uint8)], axis=2)  # DSB images are RGBA
    path = imwrite(tmp_path / "bf.png", rgba)
    np.testing.assert_array_equal(read_image(path), BRIGHTFIELD)
    np.testing.assert_array_equal(read_image(path, modality="keep"), BRIGHTFIELD)
    notes: dict = {}
    got = read_image(path, "auto", notes, modality="fluorescence")
    np.testing.assert_array_equal(got, 255 - BRIGHTFIELD[..., :1])
    assert notes == {"images_brightfield_inverted": {"count": 1, "examples": ["bf.png"]}}


def test_image_decoder_applies_the_option_and_warns_once(tmp_path, caplog):
    paths = [imwrite(tmp_path / f"{i}.png", BRIGHTFIELD) for i in range(2)]
    decoder = ImageDecoder("auto", "fluorescence")
    for path in paths:
        np.testing.assert_array_equal(decoder.read(path), 255 - BRIGHTFIELD[..., :1])
    assert decoder.integrity["images_brightfield_inverted"]["count"] == 2
    assert repr(ImageDecoder("auto")) == "ImageDecoder('auto')"  # as before the option: cache keys unchanged
    assert repr(decoder) == "ImageDecoder('auto', 'fluorescence')"
    with pytest.raises(ConfigError, match="preprocess.modality 'dark' is not one of keep, fluorescence"):
        ImageDecoder("auto", "dark")


def write_dsb(root: Path) -> dict[str, np.ndarray]:
    """One bright-field and one fluorescence sample, each with the three discs as its nuclei."""
    inside = inside_discs().astype(np.uint8) * 255
    images = {"bf": BRIGHTFIELD, "fl": FLUORESCENCE}
    for sample_id, image in images.items():
        imwrite(root / sample_id / "images" / f"{sample_id}.png", image)
        imwrite(root / sample_id / "masks" / "m.png", inside)  # the three discs as one instance
    return images


def test_readers_convert_images_and_leave_labels_alone(tmp_path):
    images = write_dsb(tmp_path / "train")
    kept = open_dataset("dsb", tmp_path / "train")
    converted = open_dataset("dsb", tmp_path / "train", modality="fluorescence")
    assert kept.modality == "keep" and converted.modality == "fluorescence"
    for sample_id, image in images.items():
        as_read, as_fluo = kept.load(sample_id), converted.load(sample_id)
        np.testing.assert_array_equal(as_read.image, image)
        np.testing.assert_array_equal(as_fluo.labels, as_read.labels)
        assert as_fluo.image.shape == (*SHAPE, 1)
    np.testing.assert_array_equal(converted.load("bf").image[..., 0], 255 - BRIGHTFIELD[..., 0])
    np.testing.assert_array_equal(converted.load("fl").image[..., 0], FLUORESCENCE[..., 0])
    with pytest.raises(ConfigError, match="preprocess.modality 'inverted' is not one of keep, fluorescence"):
        open_dataset("dsb", tmp_path / "train", modality="inverted")


def test_the_cache_holds_converted_images_under_their_own_key(tmp_path):
    write_dsb(tmp_path / "train")
    common = {"n_jobs": 1, "progress": False, "cache_dir": str(tmp_path / "cache"), "weight_map": "none"}
    kept = preprocess(DsbReader(tmp_path / "train"), PreprocessSettings(**common))
    fluo = preprocess(DsbReader(tmp_path / "train", modality="fluorescence"),
                      PreprocessSettings(**common, modality="fluorescence"))
    assert fluo.directory != kept.directory  # the setting is part of the cache key
    np.testing.assert_array_equal(kept.load("bf")["image"], BRIGHTFIELD)
    # Grey repeated to preprocess.channels (3), so the model keeps the channel count it is built with.
    np.testing.assert_array_equal(fluo.load("bf")["image"], np.repeat(255 - BRIGHTFIELD[..., :1], 3, axis=2))
    np.testing.assert_array_equal(fluo.load("fl")["image"], FLUORESCENCE)
    assert fluo.integrity == {"images_brightfield_inverted": {"count": 1, "examples": ["bf.png"]}}
    assert kept.integrity == {}
    with pytest.raises(ConfigError, match="converts images with modality='keep' but preprocess.modality is "
                                          "'fluorescence'"):
        preprocess(DsbReader(tmp_path / "train"), PreprocessSettings(**common, modality="fluorescence"))


def test_keep_leaves_cache_keys_as_they_were_before_the_setting(tmp_path):
    write_dsb(tmp_path / "train")
    settings = PreprocessSettings(cache_dir=str(tmp_path / "cache"))
    assert "modality" not in settings.output_key()
    assert PreprocessSettings(modality="fluorescence").output_key()["modality"] == "fluorescence"
    reader = DsbReader(tmp_path / "train")
    older = DsbReader(tmp_path / "train")
    del older.modality  # a reader as it was before the setting existed
    ids = reader.ids()
    assert cache_key(reader, settings, ids) == cache_key(older, settings, ids)
    assert cache_key(DsbReader(tmp_path / "train", modality="fluorescence"),
                     PreprocessSettings(cache_dir=str(tmp_path / "cache"), modality="fluorescence"),
                     ids) != cache_key(reader, settings, ids)


# --- the config key ------------------------------------------------------------------------------


def test_the_config_key_validates_and_defaults_to_keep():
    assert schema.MODALITIES == modality.MODALITIES
    assert load_config("demo").preprocess.modality == "keep"
    cfg = load_config("demo", overrides=["preprocess.modality=fluorescence"])
    assert cfg.preprocess.modality == "fluorescence"
    assert PreprocessSettings.from_config(cfg.preprocess).modality == "fluorescence"
    with pytest.raises(ConfigError) as caught:
        load_config("demo", overrides=["preprocess.modality=fluorescent"])
    assert ("preprocess.modality: 'fluorescent' is not one of keep, fluorescence (did you mean 'fluorescence'?)"
            in str(caught.value))


def test_runs_saved_without_the_key_load_as_keep(tmp_path, golden_run):
    assert run_config(golden_run(tmp_path, "unet", "modality", None)).preprocess.modality == "keep"


@pytest.mark.parametrize("family", ["unet", "ssd", "maskrcnn"])
def test_submit_and_predict_convert_test_images_as_training_did(family, tmp_path, golden_run, assert_read_as_trained):
    from kseg.app.predict import open_prediction

    images, masks = tmp_path / "data" / "images", tmp_path / "data" / "masks"
    for sample_id, image in {"bf": BRIGHTFIELD, "st": STAINED, "fl": FLUORESCENCE}.items():
        imwrite(images / f"{sample_id}.png", image)
        imwrite(masks / f"{sample_id}.png", inside_discs().astype(np.uint8) * 255)
    training = open_dataset("paired", images, masks, modality="fluorescence")  # what preprocessing reads
    submission, _ = open_prediction([golden_run(tmp_path, family, "modality", "fluorescence")])
    kept, _ = open_prediction([golden_run(tmp_path / "kept", family, "modality", None)])
    assert_read_as_trained(training, submission, images)
    for sample_id in training.ids():
        original = cv2.cvtColor(cv2.imread(str(images / f"{sample_id}.png")), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(kept.read(images / f"{sample_id}.png"), original)  # keep: as the file
    np.testing.assert_array_equal(submission.read(images / "bf.png")[..., 0], 255 - BRIGHTFIELD[..., 0])
    if family == "unet":  # a grey test image goes through the model's 3-channel input
        probabilities = submission.predictor.predict(submission.read(images / "st.png"))
        assert probabilities.shape[:2] == SHAPE and np.isfinite(probabilities).all()


# --- the real DSB 2018 sample -------------------------------------------------------------------

# Groups checked by eye on contact sheets of all 111 images.
DSB_GROUPS = {"fluorescence": 86, "brightfield": 2, "stained": 23}
DSB_EXAMPLES = {
    # the brightest background (dense nuclei), the darkest, the largest image, uneven illumination
    "0ea221716cf13710214dcd331a61cea48308c3940df1d28cfc7fd817c83714e1": "fluorescence",
    "e5a6c5e01e6a4ef676a2d975374e995dd55792ea317a8e110bebc37da83a4ce8": "fluorescence",
    "c901794d1a421d52e5734500c0a2a8ca84651fb93b19cec2f411855e70cae339": "fluorescence",
    "68f833de9f8c631cedd7031b8ed9b908c42cbbc1e14254722728a8b7d596fd4c": "fluorescence",
    # grey cells on a light background (the only two)
    "7f38885521586fc6011bef1314a9fb2aa1e4935bd581b2991e1d963395eab770": "brightfield",
    "76a372bfd3fad3ea30cb163b560e52607a8281f5b042484c3a0fc6d0aa5a7450": "brightfield",
    # H&E with red tissue, purple nuclei on pale purple, the least coloured (few nuclei on white)
    "4193474b2f1c72f735b13633b219d9cabdd43c21d9c2bb4dfc4809f104ba4c06": "stained",
    "815524d88283ba10ad597b87aa1967671db776df8004a0c4291b67fc2624c22a": "stained",
    "55f98f43c152aa0dc8bea513f8ba558cc57494b81ae4ee816977816e79629c50": "stained",
    "a4c44fc5f5bf213e2be6091ccaed49d8bf039d78f6fbd9c4d7b7428cfcb2eda4": "stained",
}


@pytest.fixture(scope="module")
def dsb_sample(shared_data) -> DsbReader:
    root = shared_data / "dsb2018_stage1_train_sample" / "stage1_train"
    if not root.is_dir():
        pytest.skip(f"the DSB 2018 sample {root} is absent")
    return DsbReader(root, overlap="first")  # the public masks keep a few one-pixel overlaps


def test_dsb_sample_groups_are_the_ones_checked_by_eye(dsb_sample):
    groups = {i: image_group(read_image(dsb_sample.image_path(i))) for i in dsb_sample.ids()}
    assert len(groups) == 111 and set(groups.values()) <= set(GROUPS)
    assert {g: list(groups.values()).count(g) for g in GROUPS} == DSB_GROUPS
    assert {i: groups.get(i) for i in DSB_EXAMPLES} == DSB_EXAMPLES


def test_dsb_sample_groups_survive_the_conversion(dsb_sample):
    """Converted images read as something else (grey now, mostly dark backgrounds); the reader's
    notes still give each its group."""
    converted = {i: read_image(dsb_sample.image_path(i), integrity={}, modality="fluorescence")
                 for i in DSB_EXAMPLES}
    assert [image_group(converted[i]) for i in DSB_EXAMPLES] == ["fluorescence"] * 6 + ["brightfield"] + [
        "fluorescence"] * 3
    for sample_id, group in DSB_EXAMPLES.items():
        integrity = {}
        image = read_image(dsb_sample.image_path(sample_id), integrity=integrity, modality="fluorescence")
        assert decoded_group(image, integrity) == group, sample_id
        assert decoded_group(read_image(dsb_sample.image_path(sample_id))) == group  # kept: the image says it


def test_dsb_sample_nuclei_are_bright_after_conversion(dsb_sample):
    """Every bright-field and stained image of the sample has nuclei darker than the rest as read
    and brighter than the rest (by at least 10 grey levels) once converted."""
    checked = 0
    for sample_id in dsb_sample.ids():
        image = read_image(dsb_sample.image_path(sample_id))
        if image_group(image) == "fluorescence":
            continue
        nuclei = dsb_sample.load(sample_id).labels > 0
        before = image.mean(axis=2)
        after = as_fluorescence(image)[..., 0].astype(np.float64)
        assert before[nuclei].mean() < before[~nuclei].mean(), sample_id
        assert after[nuclei].mean() > after[~nuclei].mean() + 10, sample_id
        checked += 1
    assert checked == DSB_GROUPS["brightfield"] + DSB_GROUPS["stained"]
