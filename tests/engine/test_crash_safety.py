"""A training process killed (SIGKILL) at any point -- at seeded moments, and at named points of
the epoch snapshot -- is rerun until it finishes: every rerun resumes, the final CSV log holds each
epoch once, and with ``train.deterministic`` the final weights equal an uninterrupted run's. A torn
snapshot is passed over with a message, never a crash loop."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_fit import _flat, tiny_config

from kseg.core import runs
from kseg.engine.snapshots import FAULT_VARIABLE, PREFIX
from kseg.tasks.base import load_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 4


def command(cfg) -> list[str]:
    overrides = [f"--set={key}={value}" for key, value in _flat(cfg.to_dict(), ("preprocess", "train", "generator",
                                                                                  "model", "split", "dataset"))]
    return [sys.executable, "-m", "kseg", "train", *overrides]


def config(demo_root, folder):
    return tiny_config(demo_root, folder, "train.deterministic=true", f"train.epochs={EPOCHS}",
                       "train.schedule=cosine", "train.early_stopping=0")


def start(cfg, folder, fault: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != FAULT_VARIABLE}
    env["PYTHONPATH"] = str(ROOT)
    if fault:
        env[FAULT_VARIABLE] = fault
    return subprocess.Popen(command(cfg), cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(cfg, folder, fault: str | None = None) -> subprocess.CompletedProcess:
    job = start(cfg, folder, fault)
    out, err = job.communicate(timeout=900)
    return subprocess.CompletedProcess(job.args, job.returncode, out, err)


def final_state(folder):
    (run,) = [p for p in (folder / "runs").iterdir() if not p.name.startswith(".")]
    with open(run / runs.HISTORY) as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    return run, epochs, load_model(run / runs.LAST).get_weights()


@pytest.fixture(scope="module")
def reference(demo_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    started = time.perf_counter()
    result = finish(config(demo_root, folder), folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return (*final_state(folder), time.perf_counter() - started)


def assert_same_as_reference(folder, reference):
    run, epochs, weights = final_state(folder)
    assert epochs == list(range(EPOCHS)), "each epoch exactly once in the CSV log"
    assert json.loads((run / runs.STATUS).read_text())["state"] == "finished"
    assert not (run / runs.BACKUP).exists(), "a finished run keeps no snapshots"
    for got, expected in zip(weights, reference[2], strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("fault", ["before@1", "weights@1", "committed@2", "weights@0"])
def test_a_kill_at_a_named_point_resumes_to_the_same_weights(fault, demo_root, tmp_path, reference):
    cfg = config(demo_root, tmp_path)
    killed = finish(cfg, tmp_path, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = finish(cfg, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_as_reference(tmp_path, reference)


def owner_and_epochs(folder) -> tuple[int | None, int]:
    """(pid holding the run's lock, epochs in its CSV log) of the one run under ``folder``."""
    made = [p for p in (folder / "runs").glob("*") if not p.name.startswith(".")] if (folder / "runs").is_dir() else []
    if not made:
        return None, 0
    run = made[0]
    try:
        pid = json.loads((run / runs.LOCK).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        pid = None
    epochs = 0
    if (run / runs.HISTORY).is_file():
        with open(run / runs.HISTORY) as f:
            epochs = len(list(csv.DictReader(f)))
    return pid, epochs


def test_kills_at_seeded_moments_across_epochs_still_finish_identically(demo_root, tmp_path, reference):
    """Each job is killed at a seeded moment of its training: once it holds the run and has logged
    0 or 1 more epochs, after a seeded delay of up to 0.3 s (so at its start, in an epoch's batches
    or validation, or while the epoch's snapshot is written just after its CSV row). Moments are
    tied to the job's progress, not to the clock, so a slow or a fast machine kills each job while
    it trains."""
    cfg = config(demo_root, tmp_path)
    moments = random.Random(7)
    kills = 0
    for _ in range(6):
        job = start(cfg, tmp_path)
        more = moments.choice((0, 1))
        delay = moments.uniform(0.0, 0.3)
        deadline = time.monotonic() + 600
        target = None
        while job.poll() is None and time.monotonic() < deadline:
            pid, epochs = owner_and_epochs(tmp_path)
            if pid == job.pid:
                target = epochs + more if target is None else target
                if epochs >= target:
                    break
            time.sleep(0.05)
        time.sleep(delay)
        if job.poll() is not None:  # it finished before this moment came
            _, err = job.communicate()
            assert job.returncode == 0, err[-3000:]
            break
        job.send_signal(signal.SIGKILL)
        job.communicate(timeout=60)
        kills += 1
        made = [p for p in (tmp_path / "runs").glob("*") if not p.name.startswith(".")]
        if made and runs.run_state(made[0]) == "finished":
            break  # killed while exiting, after the run was marked finished: nothing left to resume
    else:
        result = finish(cfg, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    assert kills >= 2, "every job but the last should have been killed while it trained"
    assert_same_as_reference(tmp_path, reference)


def test_a_torn_snapshot_is_passed_over_with_a_message(demo_root, tmp_path, reference):
    cfg = config(demo_root, tmp_path)
    killed = finish(cfg, tmp_path, "committed@2")  # snapshots of epochs 2 and 3 kept, the kill follows
    assert killed.returncode == -signal.SIGKILL
    (run,) = (tmp_path / "runs").iterdir()
    newest = sorted((run / runs.BACKUP).glob(f"{PREFIX}*"))[-1]
    weights = newest / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:96])  # torn, as a kill mid-write of an in-place file leaves it
    resumed = finish(cfg, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"snapshot {newest} is unreadable" in resumed.stderr
    assert_same_as_reference(tmp_path, reference)


def test_a_full_disk_keeps_the_last_good_state(demo_root, tmp_path, reference):
    cfg = config(demo_root, tmp_path)
    failed = finish(cfg, tmp_path, "full@2")  # every write fails from epoch 2 on
    assert failed.returncode not in (0, -signal.SIGKILL), failed.stderr[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    kept = sorted(p.name for p in (run / runs.BACKUP).iterdir())
    assert kept == [f"{PREFIX}00001", f"{PREFIX}00002"], kept  # epochs 0 and 1, nothing half-written
    resumed = finish(cfg, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resum" in resumed.stderr.lower()
    assert_same_as_reference(tmp_path, reference)
