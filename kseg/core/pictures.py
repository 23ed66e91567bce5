"""Pictures for people: outlines of instances on thumbnails, boxes on images, contact sheets, PNG
files, and the input | truth | prediction | weight rows of TensorBoard.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from skimage.segmentation import find_boundaries

from kseg.core.errors import DataError
from kseg.core.fileio import atomic_write_bytes


def unit_to_uint8(array: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (probabilities, images scaled for a model) -> uint8 0..255, clipped and rounded."""
    return np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)


def _to_rgb(array: np.ndarray) -> np.ndarray:
    """Any H x W (x C) array -> uint8 H x W x 3 for a picture panel (each panel scaled to its range)."""
    array = np.asarray(array, np.float32)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[2] == 2:  # mask + border: red = mask, green = border
        array = np.concatenate([array, np.zeros_like(array[..., :1])], axis=2)
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
    rgb = scaled if scaled.ndim == 3 else np.repeat(scaled[..., None], 3, axis=2)
    return (rgb[..., :3] * 255).astype(np.uint8)


def outlined(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8 RGB of ``image`` at its own size with each object of ``labels`` (instance ids or class
    indices, 0 = background) outlined in its own colour: a label image shown as grey levels would
    draw low ids nearly black."""
    rgb = _to_rgb(image).copy()
    labels = np.asarray(labels).astype(np.int64)
    edges = find_boundaries(labels, mode="inner")
    rgb[edges] = _PALETTE[(labels[edges] - 1) % len(_PALETTE)]
    return rgb


def picture_row(image, truth, prediction, weight) -> np.ndarray:
    """Input | ground truth (outlines on the input) | prediction | weight map, side by side with a
    2 px gap."""
    panels = [_to_rgb(image), outlined(image, truth), _to_rgb(prediction), _to_rgb(weight)]
    gap = np.full((panels[0].shape[0], 2, 3), 255, np.uint8)
    row = []
    for panel in panels:
        row += [panel, gap]
    return np.concatenate(row[:-1], axis=1)


_TRUTH, _PREDICTED = (255, 64, 64), (64, 255, 64)


def draw_boxes(image: np.ndarray, truth: dict | None, detections: dict, min_score: float = 0.3) -> np.ndarray:
    """uint8 RGB picture: truth boxes red, detections with a score >= ``min_score`` green."""
    rgb = image if image.ndim == 3 and image.shape[2] == 3 else np.repeat(image.reshape(*image.shape[:2], 1), 3, 2)
    rgb = np.ascontiguousarray(rgb, np.uint8).copy()
    if truth is not None:
        for x0, y0, x1, y1 in np.round(truth["boxes"]).astype(int):
            cv2.rectangle(rgb, (x0, y0), (x1 - 1, y1 - 1), _TRUTH, 1)
    shown = detections["scores"] >= min_score
    for x0, y0, x1, y1 in np.round(detections["boxes"][shown]).astype(int):
        cv2.rectangle(rgb, (x0, y0), (x1 - 1, y1 - 1), _PREDICTED, 1)
    return rgb


# --- pictures -----------------------------------------------------------------------------------
_PALETTE = np.array([[255, 64, 64], [64, 255, 64], [80, 160, 255], [255, 220, 0], [255, 64, 255],
                     [0, 255, 255], [255, 140, 0], [180, 255, 120]], np.uint8)


def outline_panel(image: np.ndarray, target: np.ndarray, size: int = 256) -> np.ndarray:
    """uint8 ``size`` x ``size`` x 3 thumbnail of an image with each object's outline drawn in
    its own colour (letterboxed, aspect kept). Outlines are found on the shrunken label image,
    so they stay one thumbnail pixel wide instead of vanishing when a large image shrinks."""

    rgb = image if image.ndim == 3 else image[..., None]
    rgb = np.repeat(rgb[..., :1], 3, axis=2) if rgb.shape[2] == 1 else rgb[..., :3]
    labels = target if target.ndim == 2 else np.argmax(target, axis=-1) * target.any(axis=-1)
    height, width = rgb.shape[:2]
    scale = min(1.0, size / max(height, width))
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    small = np.array(cv2.resize(np.ascontiguousarray(rgb), (new_w, new_h), interpolation=cv2.INTER_AREA))
    small = small if small.ndim == 3 else np.repeat(small[..., None], 3, axis=2)
    rows = np.minimum((np.arange(new_h) + 0.5) * height / new_h, height - 1).astype(np.intp)
    cols = np.minimum((np.arange(new_w) + 0.5) * width / new_w, width - 1).astype(np.intp)
    small_labels = np.asarray(labels)[rows[:, None], cols[None, :]].astype(np.int64)
    edges = find_boundaries(small_labels, mode="inner")
    small[edges] = _PALETTE[(small_labels[edges] - 1) % len(_PALETTE)]
    panel = np.zeros((size, size, 3), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    panel[top:top + new_h, left:left + new_w] = small
    return panel


def contact_sheet(panels: Sequence[np.ndarray], columns: int = 4, gap: int = 4) -> np.ndarray:
    """Equal-sized panels in a grid with white gaps."""
    size = panels[0].shape[0]
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    sheet = np.full((rows * size + (rows - 1) * gap, columns * size + (columns - 1) * gap, 3), 255, np.uint8)
    for index, panel in enumerate(panels):
        r, c = divmod(index, columns)
        sheet[r * (size + gap):r * (size + gap) + size, c * (size + gap):c * (size + gap) + size] = panel
    return sheet


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise DataError("could not encode PNG", path)
    atomic_write_bytes(path, data.tobytes())
    return Path(path)
