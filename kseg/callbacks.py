"""Training callbacks that Keras does not ship: the competition metric on the validation split,
checkpoints of the inference model, the generator's epoch on resume, and TensorBoard pictures.

Callbacks that add values to ``logs`` (:class:`ValidationScore`, :class:`LearningRateLogger`) must
come before the ones that read them (checkpoints, CSVLogger, TensorBoard, EarlyStopping) in the
callback list: Keras hands the same ``logs`` dict to each callback in order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

from kseg.fileio import atomic_write_text
from kseg.predict import predict_image


def sync_weights(callback: keras.callbacks.Callback) -> None:
    """On JAX, reading ``callback.model`` copies the trained state into the model's variables; the
    inference model shares those variables, so do it before predicting with or saving it."""
    if callback.model is not None:
        _ = callback.model


class ValidationScore(keras.callbacks.Callback):
    """Adds ``val_<name>`` to the epoch logs: prediction -> post-processing -> ``kseg.metrics``.

    ``images`` are float32 H x W x C arrays in [0, 1]; ``truths`` the matching label images (or
    masks); ``score(truth, probabilities)`` returns one image's score; the logged value is the mean.
    """

    def __init__(self, inference_model: keras.Model, images: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                 score: Callable[[np.ndarray, np.ndarray], float], name: str = "iou_map",
                 pad_multiple: int = 16, every: int = 1):
        super().__init__()
        self.inference_model = inference_model
        self.images = list(images)
        self.truths = list(truths)
        self.score = score
        self.key = f"val_{name}"
        self.pad_multiple = pad_multiple
        self.every = max(1, int(every))
        self.last = float("nan")

    def evaluate(self) -> float:
        scores = [self.score(truth, predict_image(self.inference_model, image, self.pad_multiple))
                  for image, truth in zip(self.images, self.truths)]
        return float(np.mean(scores))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if epoch % self.every == 0 or np.isnan(self.last):
            sync_weights(self)
            self.last = self.evaluate()
        logs[self.key] = self.last


class LearningRateLogger(keras.callbacks.Callback):
    """Puts the optimizer's current learning rate into the logs (CSV log and TensorBoard)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            rate = self.model.optimizer.learning_rate
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(rate))


class EpochSync(keras.callbacks.Callback):
    """Tells the training batches which epoch runs, so a resumed run replays that epoch's data."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.set_epoch(epoch)


class InferenceCheckpoint(keras.callbacks.Callback):
    """Saves the *inference* model (image in, probabilities out) as ``best.keras`` and ``last.keras``.

    Keras' ModelCheckpoint saves the model being fitted, here the training graph with its weight-map
    and target inputs; prediction wants the image-only model that shares its layers. Files are
    written to a temporary name and renamed, and the best score survives a restart (``state.json``).
    """

    def __init__(self, inference_model: keras.Model, directory: str | Path, monitor: str = "val_iou_map",
                 mode: str = "max"):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
        self.inference_model = inference_model
        self.directory = Path(directory)
        self.monitor = monitor
        self.mode = mode
        self.state_path = self.directory / "checkpoint_state.json"
        self.best = -np.inf if mode == "max" else np.inf
        self.best_epoch = -1
        if self.state_path.is_file():
            state = json.loads(self.state_path.read_text())
            self.best, self.best_epoch = state["best"], state["best_epoch"]

    def _save(self, name: str) -> None:
        target = self.directory / name
        tmp = self.directory / f".{name}.tmp.keras"
        self.inference_model.save(tmp)
        os.replace(tmp, target)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        sync_weights(self)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._save("last.keras")
        value = logs.get(self.monitor)
        if value is None or np.isnan(value):
            return
        better = value > self.best if self.mode == "max" else value < self.best
        if better:
            self.best, self.best_epoch = float(value), int(epoch)
            self._save("best.keras")
        atomic_write_text(self.state_path, json.dumps({"monitor": self.monitor, "best": self.best,
                                                       "best_epoch": self.best_epoch, "last_epoch": int(epoch)}))


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


def picture_row(image, truth, prediction, weight) -> np.ndarray:
    """Input | ground truth | prediction | weight map, side by side with a 2 px gap."""
    panels = [_to_rgb(p) for p in (image, truth, prediction, weight)]
    gap = np.full((panels[0].shape[0], 2, 3), 255, np.uint8)
    row = []
    for panel in panels:
        row += [panel, gap]
    return np.concatenate(row[:-1], axis=1)


class TensorBoardPictures(keras.callbacks.Callback):
    """Every ``every`` epochs, writes the pictures that :meth:`pictures` returns to
    ``<log_dir>/images`` (TF summary writer: TF-only). Subclasses say what to draw."""

    def __init__(self, log_dir, every: int = 1):
        super().__init__()
        self.log_dir = str(log_dir)
        self.every = max(1, int(every))
        self._writer = None

    def pictures(self) -> list[tuple[str, np.ndarray]]:
        """``(title, uint8 H x W x 3)`` pairs for this epoch."""
        raise NotImplementedError

    def on_epoch_end(self, epoch, logs=None):
        if epoch % self.every:
            return
        import tensorflow as tf

        sync_weights(self)
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "images"))
        pictures = self.pictures()
        with self._writer.as_default():
            for title, picture in pictures:
                tf.summary.image(title, picture[None], step=epoch)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()


class TensorBoardImages(TensorBoardPictures):
    """One picture per fixed validation image: input, ground truth, prediction and weight map side
    by side."""

    def __init__(self, inference_model, log_dir, images, truths, weights, pad_multiple=16, every=1, max_images=4):
        super().__init__(log_dir, every)
        self.inference_model = inference_model
        self.samples = list(zip(images, truths, weights))[:max_images]
        self.pad_multiple = pad_multiple

    def pictures(self):
        return [(f"validation/{index}: input | truth | prediction | weight map",
                 picture_row(image, truth, predict_image(self.inference_model, image, self.pad_multiple), weight))
                for index, (image, truth, weight) in enumerate(self.samples)]
