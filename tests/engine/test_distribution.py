"""Data parallelism through ``train.strategy`` on one CPU machine, on the JAX backend: the demo
U-Net trained over two CPU devices of one process (``JAX_NUM_CPU_DEVICES=2``), and by two
processes on 127.0.0.1 (``KERAS_DISTRIBUTION_*``, the multi-host route) each feeding its half of
every global batch, ends with the weights a one-device run on the same global batches reaches.
Only the chief (process 0) writes the run folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_fit import _flat, tiny_config

from kseg.core import runs
from kseg.engine.snapshots import FAULT_VARIABLE

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
# float32: the comparisons below are of distribution, not of half-precision rounding, which differs
# with the order replicas sum in.
SETTINGS = ("train.deterministic=true", "train.epochs=2", "generator.batch_size=4", "train.early_stopping=0",
            "train.mixed_precision=off")


def start_on_jax(cfg, folder: Path, strategy: str, **env) -> subprocess.Popen:
    """``kseg train`` on the JAX backend (CPU) in its own process, with extra environment ``env``."""
    overrides = [f"--set={key}={value}" for key, value in _flat(cfg.to_dict(), ("preprocess", "train", "generator",
                                                                                  "model", "split", "dataset"))]
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1",
           "PYTHONPATH": str(ROOT), **env}
    return subprocess.Popen([sys.executable, "-m", "kseg", "train", *overrides, f"--set=train.strategy={strategy}"],
                            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def weights(run: Path) -> list[np.ndarray]:
    """The final weights, read from the checkpoint's HDF5 without building the model."""
    import h5py

    arrays = []
    with zipfile.ZipFile(run / runs.LAST) as archive, archive.open("model.weights.h5") as raw:
        with h5py.File(raw, "r") as store:
            store.visititems(lambda name, item: arrays.append((name, item[()])) if isinstance(item, h5py.Dataset)
                             else None)
    return [array for _, array in sorted(arrays, key=lambda pair: pair[0])]


def start_pair(cfg, folder: Path, address: str, **env) -> list[subprocess.Popen]:
    """Processes 0 (the chief) and 1 of a two-process job on 127.0.0.1."""
    return [start_on_jax(cfg, folder, "auto", KERAS_DISTRIBUTION_JOB_ADDRESSES=address,
                         KERAS_DISTRIBUTION_NUM_PROCESSES="2", KERAS_DISTRIBUTION_PROCESS_ID=str(index), **env)
            for index in (0, 1)]


def wait(name: str, processes: list[subprocess.Popen], returncode: int = 0) -> list[str]:
    errors = []
    for job in processes:
        _, err = job.communicate(timeout=900)
        assert job.returncode == returncode, f"{name}: {err[-3000:]}"
        errors.append(err)
    return errors


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    """Every job started at once: {name: (run folders made, stderr of each process)}. The
    two-process job ("resumed") is killed (SIGKILL, both processes) right after epoch 0's snapshot,
    then rerun to the end."""
    names = ("one_device", "two_devices", "resumed")
    folders = {name: tmp_path_factory.mktemp(name) for name in names}
    cfg = {name: tiny_config(demo_root, folder, *SETTINGS) for name, folder in folders.items()}
    jobs = {
        "one_device": [start_on_jax(cfg["one_device"], folders["one_device"], "default")],
        "two_devices": [start_on_jax(cfg["two_devices"], folders["two_devices"], "auto", JAX_NUM_CPU_DEVICES="2")],
    }
    killed = start_pair(cfg["resumed"], folders["resumed"], f"127.0.0.1:{free_port()}",
                        **{FAULT_VARIABLE: "committed@0"})
    wait("killed", killed, -signal.SIGKILL)
    jobs["resumed"] = start_pair(cfg["resumed"], folders["resumed"], f"127.0.0.1:{free_port()}")
    done = {}
    for name, processes in jobs.items():
        errors = wait(name, processes)
        made = [p for p in (folders[name] / "runs").iterdir() if not p.name.startswith(".")]
        done[name] = (made, errors)
    return done


def assert_same_weights(run: Path, reference: Path) -> None:
    got, expected = weights(run), weights(reference)
    assert len(got) == len(expected) > 10
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def placement(run: Path) -> str:
    return json.loads((run / runs.RESULTS).read_text())["placement"]


def test_jax_data_parallel_over_two_devices_equals_one_device(trained):
    (one,), _ = trained["one_device"]
    (two,), _ = trained["two_devices"]
    assert placement(one) == "jax data-parallel over 1 device(s)"
    assert placement(two) == "jax data-parallel over 2 device(s)"
    assert_same_weights(two, one)


def test_two_processes_train_as_one_on_the_global_batch_and_resume_together(trained):
    """Epoch 0 is trained by both processes, both are killed after its snapshot, and the rerun
    trains epoch 1: the result equals the one-device run only if every step used both halves."""
    (one,), _ = trained["one_device"]
    made, (chief_err, worker_err) = trained["resumed"]
    assert len(made) == 1, made  # the chief's run folder only; the worker wrote into a scratch folder
    (run,) = made
    assert placement(run) == "jax data-parallel over 2 device(s) in 2 processes"
    assert "worker (not the chief)" in worker_err and "worker (not the chief)" not in chief_err
    scratch = Path(worker_err.split("scratch run folder ", 1)[1].split()[0])
    assert scratch.name.startswith("kseg-worker-") and not scratch.exists()  # removed when training ended
    assert "resuming at epoch 1" in chief_err  # the worker resumes from what the chief sent it
    assert [int(line.split(",")[0]) for line in (run / runs.HISTORY).read_text().splitlines()[1:]] == [0, 1]
    assert_same_weights(run, one)


def test_a_multi_worker_tf_config_is_refused_with_the_route_that_works(monkeypatch):
    from kseg.core.errors import ConfigError
    from kseg.engine.distribute import initialize_processes, strategy_scope

    cluster = {"cluster": {"worker": ["127.0.0.1:23456", "127.0.0.1:23457"]}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))
    with pytest.raises(ConfigError, match=r"keras-team/keras#20585.*KERAS_BACKEND=jax"):
        strategy_scope("auto")
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    with pytest.raises(ConfigError, match="the Keras backend is tensorflow: multi-process training runs on KERAS_BACKEND=jax"):
        initialize_processes()
