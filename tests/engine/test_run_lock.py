"""Run locks: a live run is never joined or resumed; a run whose trainer died (even by SIGKILL)
is resumed; two identical trainings started together each finish in their own run folder."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_fit import _flat, tiny_config

from kseg.core import runs

ROOT = Path(__file__).resolve().parents[2]


def _holder(run: Path) -> subprocess.Popen:
    """Another process that takes the run's lock and keeps it until killed."""
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from kseg.core.runs import RunLock; "
            f"lock = RunLock({str(run)!r}); assert lock.acquire(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_live_run_is_not_resumed_and_a_killed_one_is(demo_root, tmp_path):
    cfg = tiny_config(demo_root, tmp_path)
    run = runs.new_run_dir(cfg)
    runs.write_status(run, cfg, "running")
    assert runs.find_resumable_run(cfg) == run  # unfinished, nobody trains it

    holder = _holder(run)
    try:
        assert runs.in_use(run)
        assert runs.find_resumable_run(cfg) is None, "a live run must not be resumed"
        lock = runs.RunLock(run)
        assert not lock.acquire()
        owner = lock.owner()
        assert f"pid {holder.pid} on " in owner and "last heartbeat" in owner
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert not runs.in_use(run), "the kernel drops a killed process's lock"
    assert runs.find_resumable_run(cfg) == run


def test_new_run_directories_are_distinct_when_created_together(demo_root, tmp_path):
    cfg = tiny_config(demo_root, tmp_path)
    made = [runs.new_run_dir(cfg) for _ in range(5)]
    assert len(set(made)) == 5 and all(p.is_dir() for p in made)


@pytest.mark.slow
def test_two_identical_trainings_at_once_both_finish_in_their_own_runs(demo_root, tmp_path):
    cfg = tiny_config(demo_root, tmp_path)
    overrides = [f"--set={key}={value}" for key, value in _flat(cfg.to_dict(), ("preprocess", "train", "generator",
                                                                                  "model", "split", "dataset"))]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    jobs = [subprocess.Popen([sys.executable, "-m", "kseg", "train", *overrides], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [job.communicate(timeout=900) for job in jobs]
    for job, (out, err) in zip(jobs, outputs):
        assert job.returncode == 0, err[-3000:]
    made = sorted((tmp_path / "runs").iterdir())
    assert len(made) == 2, made
    for run in made:
        status = json.loads((run / runs.STATUS).read_text())
        assert status["state"] == "finished"
        with open(run / runs.HISTORY) as f:
            assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2]
        for name in (runs.BEST, runs.LAST, runs.RESULTS, runs.CONFIG):
            assert (run / name).is_file(), (run, name)
        assert not list(run.glob(".*.tmp*")), "no temporary file left behind"
        assert not runs.in_use(run)
    # Each job names its own folder.
    named = {line.split(": ", 1)[1] for out, _ in outputs for line in out.splitlines() if line.startswith("run: ")}
    assert named == {str(run) for run in made}


def test_only_the_chief_of_a_multi_worker_job_takes_the_run(demo_root, tmp_path, monkeypatch):
    from kseg.engine.distribute import is_chief
    from kseg.engine.fit import open_run

    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert not is_chief()
    cfg = tiny_config(demo_root, tmp_path)
    scratch, lock, _ = open_run(cfg, None)
    lock.release()
    assert not scratch.is_relative_to(tmp_path), "a worker writes outside the runs folder"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    assert is_chief()
    with_chief = {"cluster": {**cluster, "chief": ["127.0.0.1:0"]}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(with_chief))
    assert not is_chief()
    monkeypatch.delenv("TF_CONFIG")
    assert is_chief()
    run, lock, _ = open_run(cfg, None)
    lock.release()
    assert run.parent == tmp_path / "runs"
