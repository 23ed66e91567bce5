"""A broken test image is found before anything is predicted (all listed, or skipped and written as
"nothing found"), and an interrupted make submit resumes from the per-image predictions it kept."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from test_submit import stand_in_run

from kseg.core.errors import DataError
from kseg.submission.make import CACHE_FOLDER, make_submission
from kseg.tasks.semantic.task import SemanticSubmission


def copied_test_folder(tmp_path, demo_root, copies: int = 3):
    """The demo's test images, each also copied under new ids: a few images to interrupt between."""
    folder = tmp_path / "test_images"
    for source in sorted((demo_root / "stage1_test").iterdir()):
        for k in range(copies):
            image_id = f"{source.name}{k}"
            (folder / image_id / "images").mkdir(parents=True)
            shutil.copy(source / "images" / f"{source.name}.png", folder / image_id / "images" / f"{image_id}.png")
    return folder


def corrupt(folder, image_id):
    path = folder / image_id / "images" / f"{image_id}.png"
    path.write_bytes(path.read_bytes()[:60])  # a truncated PNG: header, no image data
    return path


def test_unreadable_test_images_are_all_listed_before_any_prediction(tmp_path, demo_root, monkeypatch):
    run = stand_in_run(tmp_path, demo_root)
    folder = copied_test_folder(tmp_path, demo_root)
    ids = sorted(p.name for p in folder.iterdir())
    bad = [corrupt(folder, ids[1]), corrupt(folder, ids[4])]
    predicted = []
    real = SemanticSubmission.predict
    monkeypatch.setattr(SemanticSubmission, "predict", lambda self, image: predicted.append(1) or real(self, image))
    with pytest.raises(DataError, match="2 test image\\(s\\) cannot be read") as error:
        make_submission([run], test_dir=folder, out_dir=tmp_path / "subs", progress=False)
    assert all(str(path) in str(error.value) for path in bad)
    assert predicted == [], "nothing is predicted before the images are checked"
    assert not (tmp_path / "subs").exists() or not list((tmp_path / "subs").glob("*.csv"))


def test_skip_writes_a_valid_csv_with_nothing_for_the_unreadable_images(tmp_path, demo_root):
    run = stand_in_run(tmp_path, demo_root)
    folder = copied_test_folder(tmp_path, demo_root)
    ids = sorted(p.name for p in folder.iterdir())
    corrupt(folder, ids[2])
    result = make_submission([run], test_dir=folder, out_dir=tmp_path / "subs", progress=False,
                             overrides=["submission.on_error=skip"])
    assert result.skipped == [ids[2]]
    frame = pd.read_csv(result.csv, dtype=str, keep_default_na=False)
    assert sorted(set(frame["ImageId"])) == ids  # validated: every image has its rows
    assert frame.loc[frame["ImageId"] == ids[2], "EncodedPixels"].tolist() == [""]
    assert (frame.loc[frame["ImageId"] != ids[2], "EncodedPixels"] != "").any()


def test_an_interrupted_submission_resumes_and_writes_the_same_csv(tmp_path, demo_root, monkeypatch):
    run = stand_in_run(tmp_path, demo_root)
    folder = copied_test_folder(tmp_path, demo_root)
    uninterrupted = make_submission([run], test_dir=folder, output=tmp_path / "a" / "submission.csv",
                                    progress=False)
    assert not (tmp_path / "a" / CACHE_FOLDER).exists(), "the kept predictions go once the CSV validates"

    calls = []
    real = SemanticSubmission.predict

    def interrupted(self, image):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, image)

    monkeypatch.setattr(SemanticSubmission, "predict", interrupted)
    output = tmp_path / "b" / "submission.csv"
    with pytest.raises(KeyboardInterrupt):
        make_submission([run], test_dir=folder, output=output, progress=False)
    assert not output.exists()
    assert len(list((tmp_path / "b" / CACHE_FOLDER).glob("*.json"))) == 3

    calls.clear()
    monkeypatch.setattr(SemanticSubmission, "predict", lambda self, image: calls.append(1) or real(self, image))
    resumed = make_submission([run], test_dir=folder, output=output, progress=False)
    assert len(calls) == 6 - 3, "only the images not predicted before the interruption"
    assert resumed.csv.read_bytes() == uninterrupted.csv.read_bytes()
    assert not (tmp_path / "b" / CACHE_FOLDER).exists()
