"""Prediction: run models, test-time augmentation, sliding-window tiling, fold ensembles.

Images go in as read (uint8 H x W x C) and probabilities come out at the original height and
width, float32 H x W x K, so post-processing and submission writers never see the training
geometry. In between, each run's own config reproduces what training did to an image
(``preprocess.channels``, ``preprocess.mode`` resize/pad, the generator's ``float32 * (1/255)``
scaling and zero padding to the model's divisor), and the steps are undone in reverse.

Memory: an image larger than ``tile_size`` is predicted in overlapping tiles, a few at a time.
The only full-size arrays are the uint8 input and one float32 accumulator; the blending weights
are separable, so their sum is the outer product of two 1-D arrays rather than an H x W array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import keras
import numpy as np

from kseg.core.config import Config
from kseg.core.errors import ConfigError
from kseg.data.preprocess import (
    PreprocessSettings,
    pad_amounts,
    resize_sample,
    to_channels,
)
from kseg.nn.predict import call_model, round_up
from kseg.tasks.base import LoadedModel

# --- test-time augmentation -------------------------------------------------------------------
# Each transform acts on (B, H, W, C) batches; the inverse maps a prediction on the transformed
# batch back onto the original pixel grid.
_TRANSFORMS = {
    "identity": (lambda x: x, lambda y: y),
    "flip_h": (lambda x: x[:, :, ::-1], lambda y: y[:, :, ::-1]),
    "flip_v": (lambda x: x[:, ::-1], lambda y: y[:, ::-1]),
    "rot90": (lambda x: np.rot90(x, 1, axes=(1, 2)), lambda y: np.rot90(y, -1, axes=(1, 2))),
    "rot180": (lambda x: x[:, ::-1, ::-1], lambda y: y[:, ::-1, ::-1]),
    "rot270": (lambda x: np.rot90(x, -1, axes=(1, 2)), lambda y: np.rot90(y, 1, axes=(1, 2))),
    "transpose": (lambda x: x.transpose(0, 2, 1, 3), lambda y: y.transpose(0, 2, 1, 3)),
    "transverse": (lambda x: x[:, ::-1, ::-1].transpose(0, 2, 1, 3),
                   lambda y: y.transpose(0, 2, 1, 3)[:, ::-1, ::-1]),
}


TRANSFORMS = tuple(_TRANSFORMS)


"""The eight flips and rotations of the square (the dihedral group D4)."""


TTA_PRESETS = {
    "none": ("identity",),
    "flips": ("identity", "flip_h", "flip_v"),
    "rotations": ("identity", "rot90", "rot180", "rot270"),
    "d4": TRANSFORMS,
}


def tta_transforms(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Transform names from a preset name (``none``, ``flips``, ``rotations``, ``d4``) or a list."""
    if spec is None or spec is False:
        return TTA_PRESETS["none"]
    if isinstance(spec, str):
        if spec in TTA_PRESETS:
            return TTA_PRESETS[spec]
        spec = [s.strip() for s in spec.split(",")]
    names = tuple(spec)
    unknown = [n for n in names if n not in _TRANSFORMS]
    if unknown or not names:
        raise ConfigError(f"predict.tta {spec!r}: unknown transform(s) {unknown}; use a preset "
                          f"({', '.join(TTA_PRESETS)}) or a list of {', '.join(TRANSFORMS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"predict.tta {spec!r} names a transform twice (it would weigh double)")
    return names


def predict_batch(model: keras.Model, batch: np.ndarray, pad_multiple: int = 1,
                  tta: Sequence[str] = ("identity",)) -> np.ndarray:
    """(B, H, W, K) float32 probabilities of a (B, H, W, C) float32 batch, averaged over ``tta``.

    The batch is zero-padded at the bottom/right to the divisor once; each transform is applied
    to the padded batch and undone on the prediction before cropping, so rotations of
    non-square batches stay valid model inputs.
    """
    count, height, width = batch.shape[:3]
    padded_h, padded_w = round_up(height, pad_multiple), round_up(width, pad_multiple)
    if (padded_h, padded_w) != (height, width):
        padded = np.zeros((count, padded_h, padded_w, batch.shape[3]), np.float32)
        padded[:, :height, :width] = batch
    else:
        padded = np.asarray(batch, np.float32)
    total = None
    for name in tta:
        forward, inverse = _TRANSFORMS[name]
        prediction = inverse(call_model(model, np.ascontiguousarray(forward(padded))))
        if total is None:
            total = np.array(prediction, np.float32)  # a writable copy, whatever view came back
        else:
            total += prediction
    if len(tta) > 1:
        total *= np.float32(1 / len(tta))
    return total[:, :height, :width]


def _scaled(pixels: np.ndarray) -> np.ndarray:
    """Model input values as the generator makes them: uint8 -> float32 * float32(1/255)."""
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) * np.float32(1 / 255)
    return pixels.astype(np.float32, copy=False)


# --- tiling -----------------------------------------------------------------------------------
def tile_starts(length: int, tile: int, overlap: int) -> tuple[np.ndarray, int]:
    """(start of every tile along one axis, tile extent): tiles cover ``length`` with at least
    ``overlap`` shared pixels; one tile of the full extent when ``length <= tile``."""
    if length <= tile:
        return np.zeros(1, np.int64), length
    if not 0 <= overlap < tile:
        raise ConfigError(f"predict.tile_overlap={overlap} must be in 0..{tile - 1} (tile size {tile})")
    count = math.ceil((length - overlap) / (tile - overlap))
    return np.round(np.linspace(0, length - tile, count)).astype(np.int64), tile


def blend_window(extent: int, ramp: int, before: bool, after: bool) -> np.ndarray:
    """1-D float32 weights of one tile: a raised-cosine ramp on each side that has a neighbour.

    The outer quarter of a ramp gets a near-zero weight: zero padding spoils a convolution's
    output next to the tile's edge, and the neighbouring tile sees those pixels well inside.
    Every weight stays positive, so the blended sum is defined everywhere; sides at the image
    edge keep weight 1, where no other tile competes.
    """
    window = np.ones(extent, np.float32)
    ramp = min(ramp, extent // 2)
    if ramp > 0:
        dead = ramp // 4
        rise = np.full(ramp, 1e-6, np.float32)
        rise[dead:] = np.maximum(1e-6, 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp - dead) + 0.5) / (ramp - dead)))
        if before:
            window[:ramp] = rise
        if after:
            window[extent - ramp:] = rise[::-1]
    return window


def predict_tiled(model: keras.Model, image: np.ndarray, pad_multiple: int = 1, tile_size: int | None = 512,
                  overlap: int = 64, tta: Sequence[str] = ("identity",), batch_size: int = 4) -> np.ndarray:
    """float32 H x W x K probabilities of one image, in overlapping tiles when it is large.

    ``image`` is uint8 (scaled by 1/255 per tile, as the generator does) or float (taken as
    scaled). Tiles are ``tile_size`` (rounded down to the divisor) square, predicted
    ``batch_size`` at a time and blended with :func:`blend_window`; an image that fits in one
    tile is predicted whole. Only the float32 accumulator is full-size.
    """
    if image.ndim == 2:
        image = image[..., None]
    height, width = image.shape[:2]
    pad_multiple = max(1, int(pad_multiple))
    tile = max(pad_multiple, (int(tile_size) // pad_multiple) * pad_multiple) if tile_size else max(height, width)
    rows, tile_h = tile_starts(height, tile, overlap)
    cols, tile_w = tile_starts(width, tile, overlap)
    if rows.size == 1 and cols.size == 1:
        return predict_batch(model, _scaled(image)[None], pad_multiple, tta)[0]
    row_windows = [blend_window(tile_h, overlap, i > 0, i < rows.size - 1) for i in range(rows.size)]
    col_windows = [blend_window(tile_w, overlap, j > 0, j < cols.size - 1) for j in range(cols.size)]
    row_total = np.zeros(height, np.float32)
    col_total = np.zeros(width, np.float32)
    for start, window in zip(rows, row_windows):
        row_total[start:start + tile_h] += window
    for start, window in zip(cols, col_windows):
        col_total[start:start + tile_w] += window

    grid = [(i, j) for i in range(rows.size) for j in range(cols.size)]
    accumulator = None
    batch = np.empty((min(batch_size, len(grid)), tile_h, tile_w, image.shape[2]), np.float32)
    for first in range(0, len(grid), max(1, batch_size)):
        chunk = grid[first:first + batch_size]
        for k, (i, j) in enumerate(chunk):
            batch[k] = _scaled(image[rows[i]:rows[i] + tile_h, cols[j]:cols[j] + tile_w])
        predictions = predict_batch(model, batch[:len(chunk)], pad_multiple, tta)
        if accumulator is None:
            accumulator = np.zeros((height, width, predictions.shape[-1]), np.float32)
        for k, (i, j) in enumerate(chunk):
            weights = row_windows[i][:, None, None] * col_windows[j][None, :, None]
            accumulator[rows[i]:rows[i] + tile_h, cols[j]:cols[j] + tile_w] += predictions[k] * weights
    # The summed weight at (y, x) is row_total[y] * col_total[x]: divide in place, axis by axis.
    accumulator /= row_total[:, None, None]
    accumulator /= col_total[None, :, None]
    return accumulator


# --- geometry: what preprocessing did, and its inverse ------------------------------------------
def to_model_geometry(image: np.ndarray, preprocess: Config | dict) -> tuple[np.ndarray, dict]:
    """(image as the model saw it in training, how to undo it) for one uint8 H x W x C image.

    Mirrors :func:`kseg.data.preprocess.process_sample`: channel count, then resize to
    ``preprocess.size`` or symmetric reflect padding up to it.
    """

    settings = PreprocessSettings.from_config(preprocess)
    if image.ndim == 2:
        image = image[..., None]
    undo = {"shape": image.shape[:2], "mode": settings.mode, "pads": None}
    image = to_channels(image, settings.channels)
    if settings.mode == "resize":
        image, _ = resize_sample(image, None, settings.size)
    elif settings.mode == "pad":
        pads = pad_amounts(image.shape[0], image.shape[1], settings.size)
        undo["pads"] = pads
        image = np.pad(image, (*pads, (0, 0)), mode="reflect" if min(image.shape[:2]) > 1 else "edge")
    return image, undo


def from_model_geometry(probabilities: np.ndarray, undo: dict) -> np.ndarray:
    """Probabilities back on the original pixel grid: crop the padding or resize linearly."""
    height, width = undo["shape"]
    if undo["mode"] == "pad":
        (top, bottom), (left, right) = undo["pads"]
        return probabilities[top:probabilities.shape[0] - bottom, left:probabilities.shape[1] - right]
    if undo["mode"] == "resize" and probabilities.shape[:2] != (height, width):
        channels = probabilities.shape[2]
        resized = cv2.resize(probabilities, (width, height), interpolation=cv2.INTER_LINEAR)
        return resized.reshape(height, width, channels)
    return probabilities


class Predictor:
    """Probabilities of original-size images from one run or an ensemble of runs (e.g. folds).

    Each member uses its own preprocessing and divisor; members' probabilities are averaged on
    the original pixel grid. TTA and tiling settings come from the first run's ``predict``
    section unless given.
    """

    def __init__(self, members: Sequence[LoadedModel], tta=None, tile_size=None, tile_overlap=None,
                 batch_size=None):
        if not members:
            raise ConfigError("a Predictor needs at least one run")
        self.members = list(members)
        settings = dict(self.members[0].cfg.get("predict", {}) or {})
        self.tta = tta_transforms(tta if tta is not None else settings.get("tta", "none"))
        self.tile_size = tile_size if tile_size is not None else settings.get("tile_size", 512)
        self.tile_overlap = int(tile_overlap if tile_overlap is not None else settings.get("tile_overlap", 64))
        self.batch_size = int(batch_size if batch_size is not None else settings.get("batch_size", 4))
        if self.batch_size < 1:
            raise ConfigError(f"predict.batch_size must be at least 1, not {self.batch_size}")

    @property
    def cfg(self) -> Config:
        return self.members[0].cfg

    def predict(self, image: np.ndarray) -> np.ndarray:
        """float32 H x W x K probabilities of one uint8 H x W x C image, at its own size."""
        total = None
        for member in self.members:
            model_image, undo = to_model_geometry(image, member.cfg.preprocess)
            probabilities = predict_tiled(member.model, model_image, member.pad_multiple, self.tile_size,
                                          self.tile_overlap, self.tta, self.batch_size)
            probabilities = from_model_geometry(probabilities, undo)
            if total is None:
                total = np.array(probabilities, np.float32)
            elif probabilities.shape != total.shape:
                raise ConfigError(f"ensemble members disagree: {member.run_dir} gives {probabilities.shape[-1]} "
                                  f"output channel(s), the first run {total.shape[-1]}")
            else:
                total += probabilities
        if len(self.members) > 1:
            total *= np.float32(1 / len(self.members))
        return total
