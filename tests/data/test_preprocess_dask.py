"""Preprocessing under joblib's dask backend, on a ``dask.distributed`` cluster of worker
processes, writes the same cache as the default ``loky`` backend: same folder, same files, the
same arrays bit for bit (the ``[dask]`` extra; README "Beyond one machine")."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures_datasets import write_dsb_dataset

from kseg.data.preprocess import MANIFEST, PreprocessSettings, preprocess
from kseg.io.dsb import DsbReader

distributed = pytest.importorskip("dask.distributed", reason="the [dask] extra (dask[distributed]) is not installed")
dask = pytest.importorskip("dask")
pytestmark = pytest.mark.slow


def test_dask_cluster_writes_the_cache_loky_writes(tmp_path):
    write_dsb_dataset(tmp_path / "train", n_samples=8, shape=(64, 80), n_instances=5)
    reader = DsbReader(tmp_path / "train")

    def run(backend: str, cache: str):
        return preprocess(reader, PreprocessSettings(backend=backend, n_jobs=2, cache_dir=str(tmp_path / cache),
                                                     progress=False))

    loky = run("loky", "loky")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        # As DASK_SCHEDULER_ADDRESS=... on the command line: no client in this process, kseg connects one.
        with dask.config.set({"scheduler-address": cluster.scheduler_address}):
            on_cluster = run("dask", "dask")
        processed = sum(prefix.state_counts["memory"] + prefix.state_counts["forgotten"] + prefix.state_counts["released"]
                        for prefix in cluster.scheduler.task_prefixes.values())
    assert processed >= len(loky.ids)  # the cluster's workers did the samples
    assert on_cluster.directory.name == loky.directory.name and on_cluster.ids == loky.ids  # backend not in the key
    manifest = json.loads((on_cluster.directory / MANIFEST).read_text())
    assert manifest == json.loads((loky.directory / MANIFEST).read_text())
    files = sorted(p.name for p in on_cluster.directory.glob("*.npz"))
    assert files == sorted(p.name for p in loky.directory.glob("*.npz")) and len(files) == len(loky.ids)
    for sample_id in loky.ids:
        expected, got = loky.load(sample_id), on_cluster.load(sample_id)
        assert sorted(got) == sorted(expected) == ["image", "target", "weight"]
        for key in expected:
            assert got[key].dtype == expected[key].dtype
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{sample_id} {key}")
