"""Crash-safe epoch snapshots: a killed or failed run resumes from its last complete epoch.

At the end of every epoch the training model's weights (optimizer state included), the epoch count,
the CSV log's rows, the best-checkpoint state and the process's random generators are written into a new folder beside the others
and committed with one rename (``backup/epoch-00012``), so a kill at any instant -- or a full disk
-- leaves the previous snapshot whole. On resume the newest snapshot that loads is restored (an
unreadable one is reported and passed over, never a crash loop): the model and optimizer, the CSV
log cut back to the restored epochs (no epoch twice), the checkpoint state, and the epoch fit
starts at. The newest two snapshots are kept while the run trains; the folder goes when the run
has finished.

Keras' ``BackupAndRestore`` writes ``latest.weights.h5`` in place (a kill mid-write leaves a torn
file that every later resume dies on) and keeps the CSV log and checkpoint state outside its unit;
snapshots of runs it wrote are still read (as the oldest candidate).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from kseg.core import runs
from kseg.core.fileio import atomic_write_text
from kseg.core.log import get_logger

PREFIX = "epoch-"
KEEP = 2
WEIGHTS = "model.weights.h5"
STATE = "state.json"
# Test hook: "<point>@<epoch>" kills this process (SIGKILL) at a named point of that epoch's
# snapshot: "before" (checkpoints written, snapshot not begun), "weights" (weights written, the
# snapshot not committed), "committed" (renamed into place, older ones not yet pruned).
FAULT_VARIABLE = "KSEG_FAULT_INJECTION"

log = get_logger("engine")


@dataclass
class Restored:
    epoch: int  # epochs completed: fit starts here
    source: str
    random_state: dict | None = None  # the process's Python / NumPy generators at that epoch's end

    def apply_random_state(self) -> None:
        """Put the global generators back where the interrupted process had them: Keras shuffles the
        order of an epoch's batches with Python's ``random``, so a resumed epoch needs the same state."""
        if self.random_state:
            python = self.random_state["python"]
            random.setstate((python[0], tuple(python[1]), python[2]))
            kind, keys, position, has_gauss, cached = self.random_state["numpy"]
            np.random.set_state((kind, np.asarray(keys, np.uint32), position, has_gauss, cached))


def _random_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)]}


def _snapshots(backup: Path) -> list[Path]:
    """Committed snapshots, newest first."""
    if not backup.is_dir():
        return []
    found = [p for p in backup.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def _build_optimizer(model: keras.Model) -> None:
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def _cut_history(history: Path, epochs: int) -> None:
    """Keep the CSV log's header and its rows of epochs ``0 .. epochs - 1``."""
    if not history.is_file():
        return
    lines = history.read_text().splitlines(keepends=True)
    if not lines:
        return
    kept = [lines[0]] + [line for line in lines[1:] if line.split(",", 1)[0].strip().isdigit()
                         and int(line.split(",", 1)[0]) < epochs]
    if epochs == 0:
        history.unlink()
    else:
        atomic_write_text(history, "".join(kept))


def restore(run: Path, model: keras.Model) -> Restored:
    """Load the newest readable snapshot of ``run`` into the (compiled) training model and put the
    run's CSV log and checkpoint state back to that epoch; epoch 0 when there is none."""
    backup = run / runs.BACKUP
    for stale in backup.glob(".*.tmp") if backup.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)  # a snapshot that was never committed
    _build_optimizer(model)
    for snapshot in _snapshots(backup):
        try:
            state = json.loads((snapshot / STATE).read_text())
            model.load_weights(str(snapshot / WEIGHTS))
        except Exception as exc:  # noqa: BLE001 - any unreadable snapshot: fall back to an older one
            log.warning(f"warning: snapshot {snapshot} is unreadable ({exc.__class__.__name__}: {exc}); "
                        "trying an older one")
            continue
        epoch = int(state["epoch"])
        if (snapshot / runs.HISTORY).is_file():
            shutil.copyfile(snapshot / runs.HISTORY, run / runs.HISTORY)
        _cut_history(run / runs.HISTORY, epoch)
        if (snapshot / runs.CHECKPOINT_STATE).is_file():
            shutil.copyfile(snapshot / runs.CHECKPOINT_STATE, run / runs.CHECKPOINT_STATE)
        return Restored(epoch, str(snapshot), state.get("random"))
    legacy = _restore_keras_backup(backup, model)
    if legacy is not None:
        _cut_history(run / runs.HISTORY, legacy.epoch)
        return legacy
    _cut_history(run / runs.HISTORY, 0)
    (run / runs.CHECKPOINT_STATE).unlink(missing_ok=True)
    return Restored(0, "")


def _restore_keras_backup(backup: Path, model: keras.Model) -> Restored | None:
    weights, metadata = backup / "latest.weights.h5", backup / "training_metadata.json"
    if not (weights.is_file() and metadata.is_file()):
        return None
    try:
        epoch = int(json.loads(metadata.read_text())["epoch"])
        model.load_weights(str(weights))
    except Exception as exc:  # noqa: BLE001
        log.warning(f"warning: the backup in {backup} is unreadable ({exc.__class__.__name__}: {exc}); "
                    "starting from epoch 0")
        return None
    return Restored(epoch, str(weights))


def discard(run: Path) -> None:
    """Remove the snapshots of a finished run."""
    shutil.rmtree(run / runs.BACKUP, ignore_errors=True)


class EpochSnapshots(keras.callbacks.Callback):
    """Commits a snapshot at the end of every epoch (see the module notes). It must come after the
    callbacks that write the CSV log and the checkpoints, so the snapshot holds this epoch's."""

    def __init__(self, run: Path):
        super().__init__()
        self.run = Path(run)
        self.backup = self.run / runs.BACKUP
        point, _, epoch = os.environ.get(FAULT_VARIABLE, "").partition("@")
        self.fault = (point, int(epoch)) if point and epoch.isdigit() else None

    def _fault(self, point: str, epoch: int) -> None:
        if self.fault == (point, epoch):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_epoch_end(self, epoch, logs=None):
        self._fault("before", epoch)
        self.backup.mkdir(parents=True, exist_ok=True)
        staging = self.backup / f".{PREFIX}{epoch + 1:05d}.{uuid.uuid4().hex[:8]}.tmp"
        staging.mkdir()
        try:
            self.model.save_weights(str(staging / WEIGHTS))
            self._fault("weights", epoch)
            for name in (runs.HISTORY, runs.CHECKPOINT_STATE):
                if (self.run / name).is_file():
                    shutil.copyfile(self.run / name, staging / name)
            (staging / STATE).write_text(json.dumps({"epoch": epoch + 1, "random": _random_state()}))
            target = self.backup / f"{PREFIX}{epoch + 1:05d}"
            shutil.rmtree(target, ignore_errors=True)  # a replayed epoch's own earlier snapshot
            os.rename(staging, target)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            kept = _snapshots(self.backup)
            raise OSError(f"could not write the snapshot of epoch {epoch} in {self.backup} ({exc}); the last good "
                          f"state is {kept[0].name if kept else 'none'}") from exc
        self._fault("committed", epoch)
        for old in _snapshots(self.backup)[KEEP:]:
            shutil.rmtree(old, ignore_errors=True)
