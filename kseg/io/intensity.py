"""The intensity policy: how a decoded image of any depth becomes the uint8 image models see.

``preprocess.intensity`` picks it; training, ``submit`` and ``predict`` apply the one stored in
the run's ``config.yaml``, so a test image is decoded exactly as its training images were.

- ``auto`` (default): 8-bit images as they are. Wider integers are divided by the smallest bit
  depth among 8, 10, 12, 14 and 16 that holds the image's largest value, so 12-bit camera data
  in a 16-bit file spans 0..255 instead of the 16 grey levels a plain ``>> 8`` leaves. Floats in
  [0, 1] are multiplied by 255, whole-valued floats in [0, 255] are kept, other floats (and
  negative integers) are stretched from their own minimum and maximum.
- ``uint8``: what kseg did before this policy existed (16-bit shifted right by 8 bits, everything
  else clipped to 0..255); runs trained before it load with this value.
- ``percentile``: every image, 8-bit ones too, stretched so its 0.5th..99.5th percentiles span
  0..255 (dim fluorescence, uneven exposure); the same rule at training and test time.

Under every policy an RGBA image whose colour channels are constant while its alpha varies is
read from its alpha channel (grey), and an image that is not constant but would decode to a
constant one is refused with its file name. What a policy did to an image (anything but keeping
8-bit values) is noted as one of :data:`DECODE_KINDS`, counted per dataset and reported once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from kseg.core.errors import ConfigError, DataError
from kseg.io.modality import MODALITY_KINDS

POLICIES = ("auto", "uint8", "percentile")
BIT_DEPTHS = (8, 10, 12, 14, 16)
PERCENTILES = (0.5, 99.5)
# What a policy did to an image, as the once-per-dataset warning words it.
DECODE_KINDS = {
    "images_high_bit_scaled": "image(s) of more than 8 bits scaled by their bit depth (preprocess.intensity=auto)",
    "images_float_scaled": "floating-point image(s) scaled to 0..255 (preprocess.intensity=auto)",
    "images_range_stretched": "image(s) stretched from their own value range to 0..255",
    "images_percentile_stretched": "image(s) stretched between their 0.5th and 99.5th percentiles "
                                   "(preprocess.intensity=percentile)",
    "images_high_bit_shifted": "16-bit image(s) shifted right by 8 bits (preprocess.intensity=uint8)",
    "images_alpha_only": "RGBA image(s) with constant colour read from their alpha channel",
    **MODALITY_KINDS,  # what preprocess.modality did after decoding (kseg.io.modality)
}

Note = Callable[[str, str], None]  # (kind, example) -> None


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ConfigError(f"preprocess.intensity {policy!r} is not one of {', '.join(POLICIES)}")
    return policy


def _alpha_only(array: np.ndarray) -> bool:
    """RGBA (BGRA as decoded) whose colour is one value everywhere while the alpha varies."""
    colour = array[..., :3]
    alpha = array[..., 3]
    return colour.min() == colour.max() and alpha.min() != alpha.max()


def _stretch(array: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (array.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _auto(array: np.ndarray) -> tuple[np.ndarray, str | None, str]:
    """(uint8 image, decode kind or None, what was done in a few words) under ``auto``."""
    if array.dtype == np.uint8:
        return array, None, ""
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255), None, ""
    low, high = array.min(), array.max()
    if np.issubdtype(array.dtype, np.integer) and low >= 0:
        bits = next((b for b in BIT_DEPTHS if high < 2 ** b), None)
        if bits == 8:
            return array.astype(np.uint8), None, ""
        if bits is not None:
            return _stretch(array, 0, 2 ** bits - 1), "images_high_bit_scaled", f"{bits}-bit"
    if np.issubdtype(array.dtype, np.floating):
        if low >= 0 and high <= 1:
            return _stretch(array, 0, 1), "images_float_scaled", "[0, 1] x 255"
        if low >= 0 and high <= 255 and np.array_equal(array, np.rint(array)):
            return array.astype(np.uint8), None, ""
    if high == low:
        return np.zeros(array.shape, np.uint8), None, ""
    return _stretch(array, low, high), "images_range_stretched", f"from [{low:g}, {high:g}]"


def _uint8(array: np.ndarray) -> tuple[np.ndarray, str | None, str]:
    if array.dtype == np.uint8:
        return array, None, ""
    if array.dtype == np.uint16:
        return (array >> 8).astype(np.uint8), "images_high_bit_shifted", ">> 8"
    return np.clip(array, 0, 255).astype(np.uint8), None, ""


def _percentile(array: np.ndarray) -> tuple[np.ndarray, str | None, str]:
    low, high = (float(v) for v in np.percentile(array, PERCENTILES))
    if high <= low:  # mostly one value: fall back to the full range
        low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, np.uint8), None, ""
    return _stretch(array, low, high), "images_percentile_stretched", f"[{low:g}, {high:g}]"


RULES = {"auto": _auto, "uint8": _uint8, "percentile": _percentile}


def to_uint8(array: np.ndarray, policy: str, path: str | Path, note: Note | None = None) -> np.ndarray:
    """A decoded image (H x W or H x W x C, OpenCV's BGR(A) order) as uint8 under ``policy``,
    alpha dropped (or taken, for alpha-only images); ``note(kind, example)`` hears what was done."""
    check_policy(policy)
    name = Path(path).name
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise DataError("image holds NaN or infinite values", path)
    if array.ndim == 3 and array.shape[2] == 4:
        if _alpha_only(array):
            array = array[..., 3]
            if note:
                note("images_alpha_only", name)
        else:
            array = array[..., :3]
    decoded, kind, detail = RULES[policy](array)
    # An image kept as it is stays as (non-)constant as it was: only a converted one is checked.
    if decoded is not array and decoded.min() == decoded.max() and array.min() != array.max():
        raise DataError(f"decodes to a constant image under preprocess.intensity={policy} ({array.dtype} values "
                        f"{array.min():g}..{array.max():g}); set preprocess.intensity to auto or percentile", path)
    if kind and note:
        note(kind, f"{name} ({detail})")
    return decoded


def describe(kind: str) -> str:
    return DECODE_KINDS.get(kind, kind)
