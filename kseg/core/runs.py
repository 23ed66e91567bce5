"""Run directories ``runs/<dataset>-<model>-<time>/``: the names of the files in them, their
status (running / finished, with the fingerprint of the config that must match to resume), the
newest run, and a run's saved config and tuned post-processing.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import yaml

from kseg.core.config import (
    BASE_NAME,
    PIPELINES_DIR,
    Config,
    apply_overrides,
    deep_merge,
    load_raw,
    project_path,
)
from kseg.core.errors import DataError
from kseg.core.fileio import atomic_write_text

# The files of a run directory.
CONFIG = "config.yaml"  # the resolved config the run trained with
# Settings added since some runs were trained, with the value that reproduces how those runs
# worked; ``_base.yaml``'s default applies to new runs only.
LEGACY_DEFAULTS = {("preprocess", "intensity"): "uint8", ("augment", "seeding"): "shared"}
STATUS = "status.json"  # running | finished, and the fingerprint that a resume must match
BEST = "best.keras"  # inference model of the best monitored epoch
LAST = "last.keras"  # inference model of the last epoch
CHECKPOINT_STATE = "checkpoint_state.json"  # the best score and epoch, kept across a resume
HISTORY = "history.csv"  # one row per epoch (Keras CSVLogger)
RESULTS = "results.json"  # final validation score, baselines, timing
LOGS = "logs"  # TensorBoard
BACKUP = "backup"  # Keras BackupAndRestore state of an unfinished run
LOCK = "run.lock"  # held by the process training the run (see RunLock)
TUNED = "postprocess.json"  # make tune's post-processing


# -- run directories --------------------------------------------------------------------------------
def _run_prefix(cfg: Config) -> str:
    return f"{cfg.dataset.name}-{cfg.model.name}"


# Keys added after runs were made, at the value that does what those runs did: left out of the
# fingerprint at that value, so an unfinished run (or CV folder) of an earlier version still resumes.
NEUTRAL_DEFAULTS = {("split", "near_duplicates"): False, ("train", "ema"): 0, ("train", "average_checkpoints"): 0,
                    ("train", "average_from"): "last", ("train", "cycle_epochs"): 0, ("dataset", "pseudo"): None,
                    ("train", "freeze_encoder_epochs"): 0, ("train", "encoder_lr"): 1.0,
                    ("train", "freeze_batchnorm"): False, ("train", "deep_supervision_weight"): 0.4,
                    ("train", "classification_weight"): 0.1, ("postprocess", "empty_threshold"): None}


def training_fingerprint(cfg: Config) -> str:
    """What must match for an unfinished run to be resumed (not where the logs go)."""
    settings = cfg.to_dict()
    for (section, key), value in NEUTRAL_DEFAULTS.items():
        if isinstance(settings.get(section), dict) and key in settings[section] and settings[section][key] == value:
            del settings[section][key]
    return Config(settings).fingerprint("dataset", "preprocess", "augment", "generator", "split", "model", "train",
                                        "postprocess", "detection")


class RunLock:
    """The lock a training process holds on its run directory, so a live run is never joined or
    resumed by a second job.

    ``fcntl.flock`` on ``run.lock``: the kernel releases it when the process ends, however it ends
    (a SIGKILL included), so a lock never outlives its owner and needs no staleness guess. The file
    holds the owner's pid, host, start and last heartbeat (every epoch) for the messages. flock
    is per host on some network filesystems: there, give each host its own ``train.runs_dir``.
    """

    def __init__(self, run: Path):
        self.path = Path(run) / LOCK
        self.fd: int | None = None
        self.started = ""

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another live process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        self.started = datetime.now().isoformat(timespec="seconds")
        self.heartbeat()
        return True

    def heartbeat(self) -> None:
        if self.fd is None:
            return
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": self.started,
                 "heartbeat": datetime.now().isoformat(timespec="seconds")}
        data = json.dumps(owner).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def owner(self) -> str:
        """Who holds the lock, as a message."""
        try:
            owner = json.loads(self.path.read_text())
            return (f"pid {owner['pid']} on {owner['host']} (since {owner['started']}, last heartbeat "
                    f"{owner['heartbeat']})")
        except (OSError, ValueError, KeyError):
            return "another process"

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def in_use(run: Path) -> bool:
    """Whether a live process holds the run's lock."""
    lock = RunLock(run)
    if not lock.path.is_file():
        return False
    if lock.acquire():
        lock.release()
        return False
    return True


def resumable_runs(cfg: Config) -> list[Path]:
    """Unfinished runs of the same config, newest first (live ones included: see :class:`RunLock`)."""
    runs = project_path(cfg.train.runs_dir)
    if not runs.is_dir():
        return []
    fingerprint = training_fingerprint(cfg)
    found = []
    for run in sorted(runs.glob(f"{_run_prefix(cfg)}-*"), reverse=True):
        status_file = run / STATUS
        if not status_file.is_file():
            continue
        status = json.loads(status_file.read_text())
        if status.get("state") == "running" and status.get("fingerprint") == fingerprint:
            found.append(run)
    return found


def find_resumable_run(cfg: Config) -> Path | None:
    """The newest unfinished run of the same config that no live process is training."""
    return next((run for run in resumable_runs(cfg) if not in_use(run)), None)


def new_run_dir(cfg: Config, contents=None) -> Path:
    """A new run directory (two jobs starting in the same second get two).

    ``contents(folder)`` fills it before it appears under its name: the folder is made under a
    hidden temporary name and renamed into place, so a kill at any instant leaves either nothing
    or a run with its files (a left-over temporary folder is removed by the next new run)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = project_path(cfg.train.runs_dir) / f"{_run_prefix(cfg)}-{stamp}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for stale in base.parent.glob(".new-run-*"):
        if not in_use(stale):
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".new-run-", dir=base.parent))
    (staging / LOCK).touch()  # never empty: a rename cannot replace another job's new folder
    if contents is not None:
        contents(staging)
    for suffix in range(10_000):
        run = base if suffix == 0 else base.with_name(f"{base.name}-{suffix}")
        try:
            os.rename(staging, run)  # fails when the name exists and holds anything
            return run
        except OSError:
            if not run.exists():
                raise
    raise DataError("could not create a new run directory", base)


def run_state(run: Path) -> str | None:
    """``running`` or ``finished`` from the run's status file; None when it has none (not a kseg run
    of this version, or copied without it)."""
    status_file = Path(run) / STATUS
    if not status_file.is_file():
        return None
    try:
        return json.loads(status_file.read_text()).get("state")
    except ValueError:
        return None


def write_status(run: Path, cfg: Config, state: str, **extra) -> None:
    status = {"state": state, "fingerprint": training_fingerprint(cfg), **extra}
    atomic_write_text(run / STATUS, json.dumps(status, indent=1))


def newest_run(runs_dir: str | Path = "runs", finished_only: bool = True, pattern: str = "*") -> Path | None:
    """The newest run directory (by its status file's time) whose name matches ``pattern``,
    optionally only finished ones."""
    runs = project_path(runs_dir)
    candidates = sorted(runs.glob(f"{pattern}/{STATUS}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for status_file in candidates:
        if not finished_only or json.loads(status_file.read_text()).get("state") == "finished":
            return status_file.parent
    return None


def run_config(run_dir: str | Path, overrides: Iterable[str] = ()) -> Config:
    """A run's resolved ``config.yaml``, with sections added to ``_base.yaml`` since training
    filled in from it (so old runs gain e.g. ``predict`` defaults), then ``overrides``."""

    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise DataError("run directory has no config.yaml (is it a kseg run directory?)", Path(run_dir))
    saved = yaml.safe_load(path.read_text()) or {}
    if not isinstance(saved, dict):
        raise DataError("config.yaml does not hold a mapping", path)
    merged = dict(saved)
    for (section, key), value in LEGACY_DEFAULTS.items():
        if isinstance(merged.get(section), dict) and key not in merged[section]:
            merged[section] = {**merged[section], key: value}
    for key, default in load_raw(PIPELINES_DIR / BASE_NAME).items():
        if key not in merged:
            merged[key] = default
        elif key != "model" and isinstance(default, dict) and isinstance(merged[key], dict):
            # model.args belong to the run's builder: never mix in the base's.
            merged[key] = deep_merge(default, merged[key])
    return Config(apply_overrides(merged, overrides))


def tuned_postprocess(run_dir: str | Path) -> dict:
    """The run's ``postprocess.json`` values (from ``kseg tune``), or {} when it was not tuned."""
    path = Path(run_dir) / TUNED
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text())["params"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"unreadable tuned post-processing ({exc}); delete it or re-run kseg tune", path) from exc
