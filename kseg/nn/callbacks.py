"""Keras callbacks that any task's validation uses: a per-epoch validation score and a TensorBoard
picture writer (tasks say what to score and draw).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import keras
import numpy as np


def sync_weights(callback: keras.callbacks.Callback) -> None:
    """On JAX, reading ``callback.model`` copies the trained state into the model's variables; the
    inference model shares those variables, so do it before predicting with or saving it."""
    if callback.model is not None:
        _ = callback.model


class ValidationScore(keras.callbacks.Callback):
    """Adds ``val_<name>`` to the epoch logs for every score that ``evaluate()`` returns (a task's
    predictions of the validation images, scored by its evaluator), every ``every`` epochs; the
    epochs in between repeat the last scores."""

    def __init__(self, evaluate: Callable[[], dict[str, float]], every: int = 1):
        super().__init__()
        self.evaluate = evaluate
        self.every = max(1, int(every))
        self.last: dict[str, float] = {}

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if epoch % self.every == 0 or not self.last:
            sync_weights(self)
            self.last = self.evaluate()
        logs.update({f"val_{name}": value for name, value in self.last.items()})


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

    def scalars(self) -> list[tuple[str, float]]:
        """``(title, value)`` pairs drawn beside the pictures (per image values); none by default.
        Called after :meth:`pictures`, so a subclass may keep what it computed there."""
        return []

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
            for title, value in self.scalars():
                tf.summary.scalar(title, value, step=epoch)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
