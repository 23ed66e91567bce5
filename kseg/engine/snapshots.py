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

import io
import json
import os
import random
import resource
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py  # Keras' own weights format; a dependency of keras
import keras
import numpy as np

from kseg.core import runs
from kseg.core.fileio import atomic_write_text
from kseg.core.log import get_logger
from kseg.engine.distribute import broadcast_from_chief, process_count

PREFIX = "epoch-"
KEEP = 2
WEIGHTS = "model.weights.h5"
STATE = "state.json"
# Test hook: "<point>@<epoch>" kills this process (SIGKILL) at a named point of that epoch's
# snapshot: "before" (checkpoints written, snapshot not begun), "weights" (weights written, the
# snapshot not committed), "committed" (renamed into place, older ones not yet pruned); "full"
# fills the disk from the start of that epoch on (every file write fails, as on a full disk).
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


def _drop_uncommitted(backup: Path) -> None:
    for stale in backup.glob(".*.tmp") if backup.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)  # a snapshot that was never committed


def _put_back_logs(run: Path, snapshot: Path, epoch: int) -> None:
    """The run's CSV log and checkpoint state as they were when ``snapshot`` was committed."""
    if (snapshot / runs.HISTORY).is_file():
        shutil.copyfile(snapshot / runs.HISTORY, run / runs.HISTORY)
    _cut_history(run / runs.HISTORY, epoch)
    if (snapshot / runs.CHECKPOINT_STATE).is_file():
        shutil.copyfile(snapshot / runs.CHECKPOINT_STATE, run / runs.CHECKPOINT_STATE)


def _start_over(run: Path) -> None:
    """No snapshot to resume from: the run's CSV log and checkpoint state go, as before epoch 0."""
    _cut_history(run / runs.HISTORY, 0)
    (run / runs.CHECKPOINT_STATE).unlink(missing_ok=True)


def _readable(backup: Path, read: Callable[[Path], Any]) -> Iterator[tuple[Path, dict, Any]]:
    """``(snapshot, its state, read(snapshot))`` of the committed snapshots, newest first; one that
    cannot be read is reported and passed over (a fall back to an older one, never a crash loop)."""
    for snapshot in _snapshots(backup):
        try:
            state = json.loads((snapshot / STATE).read_text())
            value = read(snapshot)
        except Exception as exc:  # noqa: BLE001 - any unreadable snapshot: fall back to an older one
            log.warning(f"warning: snapshot {snapshot} is unreadable ({exc.__class__.__name__}: {exc}); "
                        "trying an older one")
            continue
        yield snapshot, state, value


def _weights_bytes(snapshot: Path) -> bytes:
    """The snapshot's weights file, checked to open as HDF5 (a torn file does not)."""
    weights = (snapshot / WEIGHTS).read_bytes()
    with h5py.File(io.BytesIO(weights), "r"):
        pass
    return weights


def _restore_in_every_process(run: Path, model: keras.Model) -> Restored:
    """:func:`restore` for a multi-process JAX job. Only the chief holds the run folder (the others
    write into a scratch one), but every process must load the same state with the same calls
    (assigning a variable is a collective operation): the chief picks the snapshot, its files are
    broadcast, and each process loads them from a temporary copy."""
    import jax

    _build_optimizer(model)
    payload = b""
    if jax.process_index() == 0:
        backup = run / runs.BACKUP
        _drop_uncommitted(backup)
        for snapshot, state, weights in _readable(backup, _weights_bytes):
            epoch = int(state["epoch"])
            _put_back_logs(run, snapshot, epoch)
            checkpoint_state = run / runs.CHECKPOINT_STATE
            header = {"epoch": epoch, "source": str(snapshot), "random": state.get("random"),
                      "checkpoint_state": checkpoint_state.read_text() if checkpoint_state.is_file() else None}
            payload = json.dumps(header).encode() + b"\0" + weights
            break
        if not payload:
            _start_over(run)
    payload = broadcast_from_chief(payload)
    if not payload:
        return Restored(0, "")
    header, weights = payload.split(b"\0", 1)
    state = json.loads(header)
    if jax.process_index() != 0 and state["checkpoint_state"] is not None:
        # The best score so far: every process must keep (and reload) the same best checkpoint.
        atomic_write_text(run / runs.CHECKPOINT_STATE, state["checkpoint_state"])
    with tempfile.TemporaryDirectory(prefix="kseg-restore-") as folder:
        path = Path(folder) / WEIGHTS
        path.write_bytes(weights)
        model.load_weights(str(path))
    return Restored(int(state["epoch"]), state["source"], state["random"])


def restore(run: Path, model: keras.Model) -> Restored:
    """Load the newest readable snapshot of ``run`` into the (compiled) training model and put the
    run's CSV log and checkpoint state back to that epoch; epoch 0 when there is none."""
    if process_count() > 1:
        return _restore_in_every_process(run, model)
    backup = run / runs.BACKUP
    _drop_uncommitted(backup)
    _build_optimizer(model)
    for snapshot, state, _ in _readable(backup, lambda snapshot: model.load_weights(str(snapshot / WEIGHTS))):
        epoch = int(state["epoch"])
        _put_back_logs(run, snapshot, epoch)
        return Restored(epoch, str(snapshot), state.get("random"))
    legacy = _restore_keras_backup(backup, model)
    if legacy is not None:
        _cut_history(run / runs.HISTORY, legacy.epoch)
        return legacy
    _start_over(run)
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

    def on_epoch_begin(self, epoch, logs=None):
        if self.fault == ("full", epoch):
            # The kernel refuses every write that would grow a file (EFBIG, an OSError as ENOSPC is):
            # the epoch's CSV row, checkpoints and snapshot fail as they would on a full disk.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

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
