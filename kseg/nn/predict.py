"""Calling an inference model on images of any size: whole images zero-padded to the model's
divisor (fully convolutional models), or resized to a fixed input and back (detectors).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import keras
import numpy as np

from kseg.core.config import Config
from kseg.core.errors import ConfigError


# --- model calls ------------------------------------------------------------------------------
def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def call_model(model: keras.Model, batch: np.ndarray) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(model(batch, training=False)), np.float32)


def predict_image(model: keras.Model, image: np.ndarray, pad_multiple: int) -> np.ndarray:
    """Probabilities for one H x W x C float image, zero-padded to the model's divisor and cropped back.

    The validation callbacks score whole images this way; zero padding matches the generator's
    validation batches, so scores here and during training agree.
    """
    height, width = image.shape[:2]
    padded_h = round_up(height, pad_multiple)
    padded_w = round_up(width, pad_multiple)
    batch = np.zeros((1, padded_h, padded_w, image.shape[2]), np.float32)
    batch[0, :height, :width] = image
    probabilities = call_model(model, batch)
    return probabilities[0, :height, :width].astype(np.float32)


def input_size(cfg: Config) -> tuple[int, int]:
    size = cfg.detection.input_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2:
        raise ConfigError(f"detection.input_size must be [height, width], got {cfg.detection.input_size}")
    return int(size[0]), int(size[1])


def model_input_size(model: keras.Model) -> tuple[int, int]:
    shape = model.inputs[0].shape
    return int(shape[1]), int(shape[2])


def detections_per_image(model: keras.Model, images: Sequence[np.ndarray], batch_size: int):
    """``(image, outputs)`` per image: the images resized to the model's input and predicted in
    batches, each output cut to the image's ``valid`` detections (boxes stay normalised)."""
    height, width = model_input_size(model)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = np.stack([resize_to(image, height, width) for image in chunk]).astype(np.float32) / 255
        out = model.predict_on_batch(batch)  # a compiled call: eager NMS is several times slower
        for row, image in enumerate(chunk):
            n = int(out["valid"][row])
            yield image, {key: value[row, :n] for key, value in out.items() if key != "valid"}


def resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    out = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if image.shape[0] > height
                     else cv2.INTER_LINEAR)
    return out if out.ndim == 3 else out[..., None]
