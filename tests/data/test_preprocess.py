"""Parallel preprocessing: per-sample results, the cache (hit, rebuild, resume), bad inputs."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_datasets import write_paired_dataset

from kseg.core.errors import ConfigError, DataError
from kseg.data.preprocess import (
    FILLING,
    PreprocessSettings,
    pad_amounts,
    preprocess,
    process_sample,
)
from kseg.data.weights import unet_weight_map
from kseg.io.paired import PairedReader
from kseg.io.sample import Sample


def disks(shape, centres, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for k, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = k
    return labels


@dataclasses.dataclass
class FakeReader:
    """A picklable in-memory instance dataset; ids listed in ``bad`` raise like a corrupt file."""

    folder: Path
    n: int = 6
    bad: tuple[str, ...] = ()
    kind: str = "instance"

    def ids(self):
        return [f"img{i}" for i in range(self.n)]

    def source_files(self, sample_id):
        return [self.folder / f"{sample_id}.marker"]

    def load(self, sample_id):
        if sample_id in self.bad or sample_id in getattr(self, "_broken", ()):  # _broken: not in the cache key
            raise DataError("cannot decode image (corrupt or unsupported file)", self.folder / f"{sample_id}.png")
        i = int(sample_id[3:])
        labels = disks((40 + i, 48), [(12, 12), (12, 23), (30, 30 + i)], 5)
        image = np.repeat((labels > 0)[..., None] * 200 + 20, 3, axis=2).astype(np.uint8)
        return Sample(sample_id, image, labels=labels)


@pytest.fixture
def reader(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(6):
        (folder / f"img{i}.marker").write_text("x")
    return FakeReader(folder)


def settings(tmp_path, **kw):
    kw.setdefault("n_jobs", 1)
    return PreprocessSettings(cache_dir=str(tmp_path / "cache"), progress=False, **kw)


def test_process_sample_weight_map_and_dtypes(reader):
    sample = reader.load("img0")
    out = process_sample(sample, PreprocessSettings())
    assert out["image"].dtype == np.uint8 and out["image"].shape == (40, 48, 3)
    assert out["target"].dtype == np.int32
    np.testing.assert_allclose(out["weight"], unet_weight_map(sample.labels), atol=1e-6)


def test_resize_keeps_label_ids_and_pad_zeroes_weights(reader):
    sample = reader.load("img1")
    resized = process_sample(sample, PreprocessSettings(mode="resize", size=(82, 96)))
    assert resized["image"].shape == (82, 96, 3)
    assert set(np.unique(resized["target"])) == {0, 1, 2, 3}
    padded = process_sample(sample, PreprocessSettings(mode="pad", size=(64, 64), channels=1))
    assert padded["image"].shape == (64, 64, 1)
    (top, bottom), (left, right) = pad_amounts(41, 48, (64, 64))
    assert (top, bottom, left, right) == (11, 12, 8, 8)
    assert (padded["weight"][:top] == 0).all() and (padded["weight"][:, :left] == 0).all()
    np.testing.assert_array_equal(padded["target"][top:-bottom, left:-right], sample.labels)


def test_cache_hit_rebuild_and_resume(tmp_path, reader):
    first = preprocess(reader, settings(tmp_path))
    assert first.ids == reader.ids() and len(list(first.directory.glob("*.npz"))) == 6
    stamp = first.path("img2").stat().st_mtime_ns
    again = preprocess(reader, settings(tmp_path, n_jobs=2))  # n_jobs does not change the output
    assert again.directory == first.directory and again.path("img2").stat().st_mtime_ns == stamp
    changed = preprocess(reader, settings(tmp_path, sigma=3.0))
    assert changed.directory != first.directory
    # A touched source file changes the key too.
    (reader.folder / "img0.marker").write_text("changed")
    assert preprocess(reader, settings(tmp_path)).directory != first.directory


def test_interrupted_run_resumes_from_finished_samples(tmp_path, reader):
    done = preprocess(reader, settings(tmp_path))
    (done.directory / "manifest.json").unlink()
    done.path("img4").unlink()
    kept = done.path("img1").stat().st_mtime_ns
    resumed = preprocess(reader, settings(tmp_path))
    assert resumed.path("img4").is_file() and resumed.path("img1").stat().st_mtime_ns == kept
    np.testing.assert_array_equal(resumed.load("img4")["target"], reader.load("img4").labels)


def test_bad_input_raises_with_file_name(tmp_path, reader):
    reader.bad = ("img3",)
    with pytest.raises(DataError, match=r"img3\.png: cannot decode"):
        preprocess(reader, settings(tmp_path))


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_a_failed_preprocessing_leaves_no_cache_folder_behind(tmp_path, reader, n_jobs):
    reader.bad = ("img4",)
    with pytest.raises(DataError, match=r"img4\.png"):
        preprocess(reader, settings(tmp_path, n_jobs=n_jobs))
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-filled, no manifest-less folder
    reader.bad = ()
    assert preprocess(reader, settings(tmp_path)).ids == reader.ids()


def test_a_failed_preprocessing_keeps_a_folder_another_job_is_filling(tmp_path, reader):
    good = preprocess(reader, settings(tmp_path))
    (good.directory / "manifest.json").unlink()  # as while the other job is still at work
    good.path("img4").unlink()
    with open(good.directory / FILLING, "a") as other_job:
        fcntl.flock(other_job, fcntl.LOCK_SH)
        reader._broken = ("img4",)  # this job fails on img4, the same cache folder
        with pytest.raises(DataError, match=r"img4\.png"):
            preprocess(reader, settings(tmp_path))
    assert list((tmp_path / "cache").iterdir()) == [good.directory]
    kept = sorted(good.path(i).name for i in reader.ids() if i != "img4")
    assert sorted(p.name for p in good.directory.glob("*.npz")) == kept  # the other job's samples


def test_bad_input_skipped_and_reported(tmp_path, reader, capsys):
    reader.bad = ("img3", "img5")
    result = preprocess(reader, settings(tmp_path, on_error="skip", n_jobs=2))
    assert result.ids == ["img0", "img1", "img2", "img4"]
    assert set(result.skipped) == {"img3", "img5"}
    err = capsys.readouterr().err
    assert "skipped 2 bad sample(s)" in err and "img3.png" in err and "img5.png" in err
    # The cached result still reports the skips, and refuses them under on_error=raise.
    preprocess(reader, settings(tmp_path, on_error="skip"))
    assert "img5.png" in capsys.readouterr().err
    with pytest.raises(DataError, match="2 bad sample"):
        preprocess(reader, settings(tmp_path, on_error="raise"))


def test_settings_validation():
    with pytest.raises(ConfigError, match="needs preprocess.size"):
        PreprocessSettings(mode="resize")
    with pytest.raises(ConfigError, match="unknown preprocess settings"):
        PreprocessSettings.from_config({"sigmaa": 3})


FILL_SCRIPT = """
import sys
from kseg.data.preprocess import PreprocessSettings, preprocess
from kseg.io.paired import PairedReader
images, masks, cache = sys.argv[1:]
data = preprocess(PairedReader(images, masks), PreprocessSettings(cache_dir=cache, n_jobs=1, progress=False))
print(data.directory)
"""


def test_two_jobs_filling_one_cache_both_finish_with_the_same_samples(tmp_path):
    write_paired_dataset(tmp_path / "images", tmp_path / "masks", n=48, shape=(160, 160))
    args = [str(tmp_path / "images"), str(tmp_path / "masks"), str(tmp_path / "cache")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    jobs = [subprocess.Popen([sys.executable, "-c", FILL_SCRIPT, *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], [err[-2000:] for _, err in results]
    (directory,) = {out.strip() for out, _ in results}
    alone = preprocess(PairedReader(tmp_path / "images", tmp_path / "masks"),
                       PreprocessSettings(cache_dir=str(tmp_path / "alone"), n_jobs=1, progress=False))
    assert Path(directory).name == alone.directory.name  # the same key
    for sample_id in alone.ids:
        with np.load(Path(directory) / alone.path(sample_id).name) as got:
            for key, expected in alone.load(sample_id).items():
                np.testing.assert_array_equal(got[key], expected, err_msg=f"{sample_id} {key}")
    assert not list(Path(directory).glob("*.tmp*"))  # no temporary file left
