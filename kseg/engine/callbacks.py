"""Training callbacks that Keras does not ship and the fit loop adds for every task: the learning
rate in the logs, checkpoints of the inference model, and the generator's epoch on resume.

Callbacks that add values to ``logs`` (the validation score of :mod:`kseg.nn.callbacks`,
:class:`LearningRateLogger`) must come before the ones that read them (checkpoints, CSVLogger,
TensorBoard, EarlyStopping) in the callback list: Keras hands the same ``logs`` dict to each
callback in order.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np

from kseg.core import runs
from kseg.core.fileio import atomic_path, atomic_write_text
from kseg.nn.callbacks import sync_weights


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
        self.state_path = self.directory / runs.CHECKPOINT_STATE
        self.best = -np.inf if mode == "max" else np.inf
        self.best_epoch = -1
        if self.state_path.is_file():
            state = json.loads(self.state_path.read_text())
            self.best, self.best_epoch = state["best"], state["best_epoch"]

    def _save(self, name: str) -> None:
        with atomic_path(self.directory / name, suffix=".tmp.keras") as tmp:
            self.inference_model.save(tmp)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        sync_weights(self)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._save(runs.LAST)
        value = logs.get(self.monitor)
        if value is None or np.isnan(value):
            return
        better = value > self.best if self.mode == "max" else value < self.best
        if better:
            self.best, self.best_epoch = float(value), int(epoch)
            self._save(runs.BEST)
        atomic_write_text(self.state_path, json.dumps({"monitor": self.monitor, "best": self.best,
                                                       "best_epoch": self.best_epoch, "last_epoch": int(epoch)}))


class BaselineScores(keras.callbacks.Callback):
    """Puts the classical and trivial baselines' validation scores (fixed, computed once) into every
    epoch's logs as ``val_baseline_<name>``, so the CSV log and TensorBoard show the monitor beside them."""

    def __init__(self, baselines: dict[str, float]):
        super().__init__()
        self.baselines = dict(baselines)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update({f"val_baseline_{name}": value for name, value in self.baselines.items()})
