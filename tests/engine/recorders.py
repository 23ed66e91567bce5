"""Callbacks that record a training model's trainable weights, for tests that check what the
checkpoints hold against an independent computation on the recorded values."""

from __future__ import annotations

import keras
import numpy as np


def trainable_weights(model: keras.Model) -> dict[str, np.ndarray]:
    """``{variable path: value}`` of the model's trainable variables (copies)."""
    return {v.path: keras.ops.convert_to_numpy(v.value).copy() for v in model.trainable_variables}


class EpochEndWeights(keras.callbacks.Callback):
    """The trainable weights at the end of every epoch."""

    def __init__(self):
        super().__init__()
        self.epochs: list[dict[str, np.ndarray]] = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(trainable_weights(self.model))
