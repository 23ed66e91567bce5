"""Weight averaging: the exponential moving average (EMA) of the weights during training, and the
average of k epochs' checkpoints after it (SWA-style).

**EMA.**
With ``train.ema: m`` (0 < m < 1) the optimizer keeps, after every step, ``average = m * average +
(1 - m) * weights`` (Keras optimizers' ``use_ema``; the first step copies the weights). Keras puts
the average into the model only when ``fit`` ends, so on its own a validation callback would score,
and a checkpoint callback save, the raw weights, and ``best.keras`` would never hold an average.
Here the average is swapped in before the epoch's validation (``val_loss``, the validation score,
the image panel, ``best.keras`` and ``last.keras`` all see it) and the raw weights are put back
before the epoch's snapshot, so training continues from them and a resumed run continues exactly.
BatchNorm's moving statistics are not trainable and stay those of the raw weights.

**Checkpoint averaging** (``train.average_checkpoints: k``, ``train.average_from: best | last``).
During training the inference model's weights of the epochs an average may use are kept in
``epochs/`` (the k best-scored so far, or the last k; the others are deleted as training goes). When
training ends their weights are averaged, BatchNorm's moving statistics are recomputed for the
averaged weights on training batches (the average of the epochs' statistics belongs to none of
them), and the result is scored on the validation images and saved as ``averaged.keras``
(``predict.checkpoint: averaged``). The last k epochs suit cross-validation: the best k were chosen
on the validation images, which would flatter their out-of-fold score.

**Snapshot ensembles** (``train.schedule: cosine_restarts``, ``train.cycle_epochs: N``). The
learning rate follows a cosine from its full value down to 5 % over each cycle of N epochs, then
restarts; the inference model at each cycle's end is kept as ``cycles/cycle-<k>.keras``, and
``predict.checkpoint: cycles`` predicts with all of them, averaged like folds (TGS Salt's winners).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from kseg.core.fileio import atomic_path, atomic_write_text

EPOCHS_DIR = "epochs"  # the kept epochs' weights and their scores
SCORES = "scores.json"
AVERAGED = "averaged.keras"
AVERAGE_FROM = ("best", "last")
CYCLES_DIR = "cycles"  # kseg.tasks.base.CYCLES_DIR
BATCHNORM_BATCHES = 50  # at most this many training batches recompute BatchNorm's statistics


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


# -- checkpoint averaging ---------------------------------------------------------------------------
def epoch_file(run: Path, epoch: int) -> Path:
    return Path(run) / EPOCHS_DIR / f"epoch-{epoch:04d}.weights.h5"


def chosen_epochs(scores: dict[int, float], k: int, average_from: str) -> list[int]:
    """The epochs to average: the ``k`` best by score (unscored epochs never) or the last ``k``."""
    if average_from not in AVERAGE_FROM:
        raise ValueError(f"average_from must be one of {AVERAGE_FROM}, not {average_from!r}")
    if average_from == "last":
        return sorted(scores)[-k:]
    scored = [e for e, v in scores.items() if v is not None and not math.isnan(v)]
    return sorted(sorted(scored, key=lambda e: (-scores[e], -e))[:k])


class EpochWeights(keras.callbacks.Callback):
    """Keeps the inference model's weights of the epochs an average may use (see the module notes);
    placed after the EMA swap-in, so with EMA on the kept weights are averages too."""

    def __init__(self, inference_model: keras.Model, run: Path, k: int, average_from: str, monitor: str):
        super().__init__()
        self.inference_model, self.run, self.k, self.average_from, self.monitor = (
            inference_model, Path(run), int(k), average_from, monitor)
        self.path = self.run / EPOCHS_DIR / SCORES
        self.scores = read_scores(self.run)

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        self.scores[int(epoch)] = None if value is None else float(value)
        keep = set(chosen_epochs(self.scores, self.k, self.average_from))
        folder = self.run / EPOCHS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        if epoch in keep:
            with atomic_path(epoch_file(self.run, epoch), suffix=".weights.h5") as tmp:
                self.inference_model.save_weights(tmp)
        atomic_write_text(self.path, json.dumps({"monitor": self.monitor, "average_from": self.average_from,
                                                 "k": self.k, "scores": self.scores}))
        for old in folder.glob("epoch-*.weights.h5"):
            if int(old.name[len("epoch-"):-len(".weights.h5")]) not in keep:
                old.unlink()


def read_scores(run: Path) -> dict[int, float | None]:
    path = Path(run) / EPOCHS_DIR / SCORES
    if not path.is_file():
        return {}
    return {int(e): v for e, v in json.loads(path.read_text())["scores"].items()}


def _is_float(variable) -> bool:
    return "float" in str(variable.dtype)


def average_weights(model: keras.Model, files: Sequence[Path]) -> None:
    """Load the mean of the weight files' floating-point weights into ``model`` (other weights,
    e.g. integer counters, keep the last file's)."""
    total = None
    for path in files:
        model.load_weights(path)
        values = [keras.ops.convert_to_numpy(v.value).astype(np.float64) if _is_float(v) else None
                  for v in model.weights]
        total = values if total is None else [t if t is None else t + v for t, v in zip(total, values)]
    for variable, value in zip(model.weights, total):
        if value is not None:
            variable.assign((value / len(files)).astype(keras.ops.convert_to_numpy(variable.value).dtype))


def batchnorm_layers(model) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer under ``model``, also those held by plain layers (keras-hub's
    EfficientNet blocks keep theirs as attributes, which ``Model.layers`` does not list)."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization)]


def batch_images(batch):
    """The image input of a training batch (``x``, ``(x, y[, w])``; ``x`` a dict with ``image``)."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return x["image"] if isinstance(x, dict) else x


def recompute_batchnorm(model: keras.Model, batches, limit: int = BATCHNORM_BATCHES) -> int:
    """BatchNorm's moving mean and variance as the plain mean of their batch statistics over up to
    ``limit`` training batches (momentum i / (i + 1) at batch i), for the model's current
    weights; returns the batches used (0 without BatchNorm). Frozen layers (``trainable=False``,
    ``train.freeze_batchnorm``) run in inference mode and keep theirs."""
    layers = [layer for layer in batchnorm_layers(model) if layer.trainable]
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.moving_mean.assign(np.zeros(layer.moving_mean.shape, "float32"))
        layer.moving_variance.assign(np.ones(layer.moving_variance.shape, "float32"))
    count = min(len(batches), int(limit))
    try:
        for i in range(count):
            for layer in layers:
                layer.momentum = i / (i + 1)
            model(batch_images(batches[i]), training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return count


# -- snapshot ensembles -------------------------------------------------------------------------------
class CycleSnapshots(keras.callbacks.Callback):
    """Saves the inference model as ``cycles/cycle-<k>.keras`` at the end of cycle k (every
    ``cycle_epochs`` epochs); placed after the EMA swap-in like the checkpoints."""

    def __init__(self, inference_model: keras.Model, run: Path, cycle_epochs: int):
        super().__init__()
        self.inference_model, self.run, self.cycle_epochs = inference_model, Path(run), int(cycle_epochs)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.cycle_epochs:
            return
        path = self.run / CYCLES_DIR / f"cycle-{(epoch + 1) // self.cycle_epochs:03d}.keras"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".tmp.keras") as tmp:
            self.inference_model.save(tmp)
