"""Weight averaging during training: the exponential moving average (EMA) of the weights.

With ``train.ema: m`` (0 < m < 1) the optimizer keeps, after every step, ``average = m * average +
(1 - m) * weights`` (Keras optimizers' ``use_ema``; the first step copies the weights). Keras puts
the average into the model only when ``fit`` ends, so on its own a validation callback would score,
and a checkpoint callback save, the raw weights, and ``best.keras`` would never hold an average.
Here the average is swapped in before the epoch's validation (``val_loss``, the validation score,
the image panel, ``best.keras`` and ``last.keras`` all see it) and the raw weights are put back
before the epoch's snapshot, so training continues from them and a resumed run continues exactly.
BatchNorm's moving statistics are not trainable and stay those of the raw weights.
"""

from __future__ import annotations

import keras
import numpy as np


def ema_optimizer(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The optimizer that keeps the moving average (a LossScaleOptimizer's inner one)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


class EmaWeights:
    """Swaps the optimizer's moving average of a model's trainable weights in and out."""

    def __init__(self):
        self.raw: list[np.ndarray] | None = None

    def swap_in(self, model: keras.Model) -> None:
        if self.raw is not None or not getattr(ema_optimizer(model.optimizer), "built", False):
            return
        self.raw = [keras.ops.convert_to_numpy(v.value) for v in model.trainable_variables]
        model.optimizer.finalize_variable_values(model.trainable_variables)

    def swap_out(self, model: keras.Model) -> None:
        if self.raw is None:
            return
        for variable, value in zip(model.trainable_variables, self.raw):
            variable.assign(value)
        self.raw = None


class EmaSwapIn(keras.callbacks.Callback):
    """First of the epoch-end callbacks: the average in, for validation and checkpoints (from the
    start of Keras' own validation pass when there is one)."""

    def __init__(self, weights: EmaWeights):
        super().__init__()
        self.weights = weights

    def on_test_begin(self, logs=None):
        self.weights.swap_in(self.model)

    def on_epoch_end(self, epoch, logs=None):
        self.weights.swap_in(self.model)


class EmaSwapOut(keras.callbacks.Callback):
    """After the checkpoints, before the epoch snapshot: the raw weights back, to train on."""

    def __init__(self, weights: EmaWeights):
        super().__init__()
        self.weights = weights

    def on_epoch_end(self, epoch, logs=None):
        self.weights.swap_out(self.model)


def ema_callbacks() -> tuple[EmaSwapIn, EmaSwapOut]:
    weights = EmaWeights()
    return EmaSwapIn(weights), EmaSwapOut(weights)
