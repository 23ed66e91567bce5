"""The intensity policy on real files of each kind a competition ships: float TIFF, 12-bit data in
16-bit PNGs, alpha-only RGBA, and images that would decode to a constant one. Expected values come
from scikit-image (``img_as_ubyte``, ``rescale_intensity``), not from the code under test."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from fixtures_datasets import nuclei_12bit, paired_12bit
from skimage.exposure import rescale_intensity
from skimage.measure import label
from skimage.util import img_as_ubyte

from kseg.core.errors import ConfigError, DataError
from kseg.data.preprocess import PreprocessSettings, preprocess
from kseg.io.paired import PairedReader
from kseg.io.readers import open_dataset
from kseg.io.sample import ImageDecoder, read_image


def write(path: Path, array: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), array), path
    return path


def count_nuclei(image: np.ndarray) -> int:
    """Objects brighter than the background (its darkest level)."""
    grey = image[..., 0]
    return int(label(grey > grey.min()).max())


def test_float_tiff_in_0_1_is_scaled_by_255(tmp_path):
    values = np.random.default_rng(1).random((40, 50)).astype(np.float32) * 0.9
    path = write(tmp_path / "float.tif", values)
    got = read_image(path)
    assert got.dtype == np.uint8 and got.shape == (40, 50, 1)
    np.testing.assert_array_equal(got[..., 0], img_as_ubyte(values))


def test_float_tiff_that_the_old_rule_made_constant_is_refused_with_its_name(tmp_path):
    values = np.random.default_rng(1).random((40, 50)).astype(np.float32) * 0.9  # all below 1: clip gives 0
    path = write(tmp_path / "float.tif", values)
    with pytest.raises(DataError, match=r"float\.tif: decodes to a constant image under preprocess\.intensity=uint8"):
        read_image(path, "uint8")


def test_float_tiff_outside_0_1_is_stretched_from_its_range(tmp_path):
    values = np.random.default_rng(2).normal(size=(30, 30)).astype(np.float32) * 300
    notes: dict = {}
    got = read_image(write(tmp_path / "wide.tif", values), "auto", notes)
    expected = np.rint(rescale_intensity(values.astype(np.float64), out_range=(0, 255))).astype(np.uint8)
    np.testing.assert_array_equal(got[..., 0], expected)
    assert notes["images_range_stretched"]["count"] == 1


def test_12bit_data_in_16bit_png_keeps_its_levels_and_its_nuclei(tmp_path):
    image, labels = nuclei_12bit()
    path = write(tmp_path / "cells.png", image)
    notes: dict = {}
    auto = read_image(path, "auto", notes)
    expected = np.rint(rescale_intensity(image.astype(np.float64), in_range=(0, 4095), out_range=(0, 255)))
    np.testing.assert_array_equal(auto[..., 0], expected.astype(np.uint8))
    assert notes == {"images_high_bit_scaled": {"count": 1, "examples": ["cells.png (12-bit)"]}}
    legacy = read_image(path, "uint8")
    assert len(np.unique(legacy)) <= 16  # what ">> 8" leaves of 12-bit data
    assert count_nuclei(auto) == labels.max() == 21
    assert count_nuclei(legacy) < 21  # the dim nuclei fall to the background's level


def test_16bit_image_with_8bit_values_is_kept_as_is(tmp_path):
    values = np.random.default_rng(3).integers(0, 256, (20, 20)).astype(np.uint16)
    notes: dict = {}
    got = read_image(write(tmp_path / "low.png", values), "auto", notes)
    np.testing.assert_array_equal(got[..., 0], values.astype(np.uint8))
    assert notes == {}


def test_full_range_16bit_rgb_is_divided_by_65535(tmp_path):
    values = np.random.default_rng(4).integers(0, 65536, (16, 24, 3)).astype(np.uint16)
    values[0, 0, 0] = 65535
    got = read_image(write(tmp_path / "rgb16.png", values))  # written BGR, read RGB
    expected = np.rint(values[..., ::-1].astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)


def test_alpha_only_rgba_is_read_from_its_alpha(tmp_path):
    alpha = np.zeros((32, 32), np.uint8)
    alpha[8:20, 5:27] = 200
    bgra = np.dstack([np.zeros((32, 32, 3), np.uint8), alpha])
    notes: dict = {}
    got = read_image(write(tmp_path / "alpha.png", bgra), "auto", notes)
    np.testing.assert_array_equal(got, alpha[..., None])
    assert notes["images_alpha_only"]["examples"] == ["alpha.png"]


def test_rgba_with_colour_drops_its_alpha(tmp_path):
    rng = np.random.default_rng(5)
    bgra = rng.integers(0, 256, (10, 12, 4)).astype(np.uint8)
    got = read_image(write(tmp_path / "rgba.png", bgra))
    np.testing.assert_array_equal(got, bgra[..., 2::-1])


def test_percentile_stretches_every_image_between_its_percentiles(tmp_path):
    values = np.random.default_rng(6).integers(20, 90, (50, 60)).astype(np.uint8)
    got = read_image(write(tmp_path / "dim.png", values), "percentile")
    low, high = np.percentile(values, (0.5, 99.5))
    expected = np.rint(rescale_intensity(values.astype(np.float64), in_range=(low, high), out_range=(0, 255)))
    np.testing.assert_array_equal(got[..., 0], expected.astype(np.uint8))


def test_a_blank_image_stays_blank_and_nan_is_refused(tmp_path):
    blank = read_image(write(tmp_path / "blank.png", np.full((8, 8), 7, np.uint16)))
    assert blank.max() == blank.min() == 7  # constant in, constant out: not refused
    nan = np.ones((8, 8), np.float32)
    nan[2, 3] = np.nan
    with pytest.raises(DataError, match=r"nan\.tif: image holds NaN"):
        read_image(write(tmp_path / "nan.tif", nan))


def test_an_unknown_policy_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="preprocess.intensity 'linear' is not one of auto, uint8, percentile"):
        read_image(write(tmp_path / "x.png", np.zeros((4, 4), np.uint8)), "linear")


def test_test_images_warn_once_per_kind(tmp_path, capsys):
    image, _ = nuclei_12bit()
    decoder = ImageDecoder("auto")
    for index in range(3):
        decoder.read(write(tmp_path / f"t{index}.png", image))
    said = [line for line in capsys.readouterr().err.splitlines() if "scaled by their bit depth" in line]
    assert len(said) == 1 and "t0.png (12-bit)" in said[0]
    assert decoder.integrity["images_high_bit_scaled"]["count"] == 3


def test_preprocessing_counts_the_decoding_once_per_dataset_and_keys_the_cache(tmp_path, capsys):
    images, masks = paired_12bit(tmp_path / "data")
    common = dict(n_jobs=1, progress=False, cache_dir=str(tmp_path / "cache"), weight_map="none")
    auto = preprocess(PairedReader(images, masks), PreprocessSettings(**common, strict_labels=True))
    err = capsys.readouterr().err
    assert err.count("images decoded to uint8 under preprocess.intensity=auto") == 1
    assert "images_high_bit_scaled: 3 image(s) of more than 8 bits" in err
    assert auto.integrity["images_high_bit_scaled"]["count"] == 3  # counted, not refused by strict_labels
    expected = np.rint(nuclei_12bit(seed=0)[0].astype(np.float64) * 255 / 4095).astype(np.uint8)
    np.testing.assert_array_equal(auto.load("s0")["image"][..., 0], expected)

    legacy = preprocess(open_dataset("paired", images, masks, intensity="uint8"),
                        PreprocessSettings(**common, intensity="uint8"))
    assert legacy.directory != auto.directory  # the policy is part of the cache key
    np.testing.assert_array_equal(legacy.load("s0")["image"][..., 0], nuclei_12bit(seed=0)[0] >> 8)


def test_a_reader_opened_with_another_policy_is_refused(tmp_path):
    images, masks = paired_12bit(tmp_path / "data", n=1)
    with pytest.raises(ConfigError, match="decodes images with intensity='auto' but preprocess.intensity is 'percentile'"):
        preprocess(PairedReader(images, masks), PreprocessSettings(intensity="percentile", n_jobs=1, progress=False,
                                                                   cache_dir=str(tmp_path / "cache")))
