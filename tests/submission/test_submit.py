"""Submission writers: every format round-trips through the validator and kseg.rle; ``make submit``
end to end with a stand-in run (a fixed tiny model saved as a checkpoint)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest

from kseg.app import cli
from kseg.codecs import rle
from kseg.codecs.relative import to_absolute, to_relative
from kseg.core.config import load_config
from kseg.core.errors import KsegError
from kseg.io.demo import make_demo_image, write_demo_dataset
from kseg.metrics.masks import iou_map
from kseg.submission.formats import FORMATS, decode_cell, get_format
from kseg.submission.make import make_submission
from kseg.submission.reading import read_targets
from kseg.submission.validation import validate_submission
from kseg.submission.writing import prediction_rows, write_submission
from kseg.tasks.semantic.postprocess import probabilities_to_target

SIZES = {"a": (12, 9), "b": (7, 15), "c": (10, 10)}


def instance_labels():
    """Three images: touching instances, one instance, none."""
    a = np.zeros(SIZES["a"], np.int32)
    a[1:5, 1:4], a[1:5, 4:8], a[8:11, 0:9] = 1, 2, 3  # 1 and 2 touch; 3 spans full width (order F wraps)
    b = np.zeros(SIZES["b"], np.int32)
    b[2:6, 10:15] = 1  # reaches the right edge (order C wraps into the next row)
    return {"a": a, "b": b, "c": np.zeros(SIZES["c"], np.int32)}


def targets_for(fmt):
    labels = instance_labels()
    if fmt.rows == "instance":
        return labels
    if fmt.rows == "image":
        return {k: (v > 0).astype(np.uint8) for k, v in labels.items()}
    return {k: np.where(v > 0, (v - 1) % 3 + 1, 0).astype(np.uint8) for k, v in labels.items()}  # classes 1..3


def write_sample(path, fmt, ids):
    placeholder = "-1" if fmt.relative else "1 1"
    rows = [(i, 1, placeholder) if fmt.rows == "image_class" else (i, placeholder) for i in ids]
    pd.DataFrame(rows, columns=list(fmt.columns)).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("name", [name for name, f in FORMATS.items() if not f.boxes])
def test_every_format_round_trips_through_the_validator_and_rle_decode(tmp_path, name):
    fmt = get_format(name)
    targets = targets_for(fmt)
    rows = [row for image_id, target in targets.items()
            for row in prediction_rows(image_id, target, fmt, num_classes=3)]
    path = write_submission(tmp_path / "sub.csv", rows, fmt)
    sample = write_sample(tmp_path / "sample.csv", fmt, list(SIZES))
    report = validate_submission(path, fmt, SIZES, sample=sample, num_classes=3)
    assert report.images == 3

    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(frame.columns) == list(fmt.columns)
    # Each cell decodes with kseg.rle (after SIIM's relative -> absolute) to the mask it came from.
    for _, row in frame.iterrows():
        image_id, cell = row[fmt.id_column], row[fmt.rle_column]
        shape = SIZES[image_id]
        absolute = "" if cell in ("", "-1") else (to_absolute(cell) if fmt.relative else cell)
        mask = rle.decode(absolute, shape, fmt.order)
        target = targets[image_id]
        if fmt.rows == "image_class":
            expected = target == int(row["ClassId"])
        elif fmt.rows == "image":
            expected = target > 0
        else:
            expected = None
        if expected is not None:
            np.testing.assert_array_equal(mask, expected)
    if fmt.rows == "instance":
        empty_image = frame[frame[fmt.id_column] == "c"]
        assert len(empty_image) == 1 and empty_image[fmt.rle_column].item() == ""
    if fmt.relative:
        assert frame.loc[frame[fmt.id_column] == "c", fmt.rle_column].item() == "-1"

    decoded = read_targets(path, fmt, SIZES, num_classes=3)
    for image_id, target in targets.items():
        got = decoded[image_id]
        if fmt.rows == "image_class":
            got = (got * np.arange(1, got.shape[-1] + 1)).max(axis=-1)  # stack -> class indices
        np.testing.assert_array_equal(got, target)


def test_relative_rle_matches_the_siim_convention():
    # Pixels 3, 4 and 8 (0-based): absolute "4 2 9 1"; SIIM writes the first start 0-based and
    # each later start as the gap after the previous run: 8 - 5 = 3.
    assert to_relative("4 2 9 1") == "3 2 3 1"
    assert to_absolute("3 2 3 1") == "4 2 9 1"
    fmt = get_format("siim_acr")
    np.testing.assert_array_equal(decode_cell("3 2 3 1", (10, 1), fmt)[:, 0], [0, 0, 0, 1, 1, 0, 0, 0, 1, 0])


def test_carvana_is_row_major_and_tgs_column_major():
    mask = np.zeros((3, 4), np.uint8)
    mask[0, 1:3] = 1
    assert prediction_rows("x", mask, get_format("carvana")) == [("x", "2 2")]
    assert prediction_rows("x", mask, get_format("tgs_salt")) == [("x", "4 1 7 1")]


def test_probabilities_to_target_follows_the_format():
    probabilities = np.zeros((20, 20, 2), np.float32)
    probabilities[2:8, 2:8, 0] = 0.9
    probabilities[12:18, 12:18, 0] = 0.9
    post = {"method": "components", "threshold": 0.5, "min_size": 4}
    labels = probabilities_to_target(probabilities, get_format("dsb_instances"), post)
    assert labels.dtype == np.int32 and labels.max() == 2
    mask = probabilities_to_target(probabilities, get_format("tgs_salt"), post)
    np.testing.assert_array_equal(mask, labels > 0)
    softmax = np.zeros((20, 20, 3), np.float32)
    softmax[..., 0] = 1
    softmax[2:8, 2:8] = [0, 0, 1]
    classes = probabilities_to_target(softmax, get_format("severstal"), post, targets="classes")
    assert set(np.unique(classes)) == {0, 2}


# -- make submit with a stand-in run --------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, seed=5, n_train=0, n_test=3)
    return root


def stand_in_run(tmp_path, demo_root):
    """A run directory whose checkpoint is a fixed 1x1 convolution: bright pixels are foreground
    (fluorescence demo images), channel 1 a weak border guess. Enough to exercise every step."""
    run = tmp_path / "runs" / "demo-unet-20240101-000000"
    run.mkdir(parents=True)
    cfg = load_config("demo", data_root=str(demo_root), overrides=[
        "model.args.depth=2", "predict.tta=flips", "postprocess.method=components", "postprocess.min_size=8",
        f"train.runs_dir={tmp_path / 'runs'}", "submission.sheet_images=2"])
    cfg.dump(run / "config.yaml")
    inputs = keras.Input((None, None, 3), name="image")
    layer = keras.layers.Conv2D(2, 1, activation="sigmoid")
    model = keras.Model(inputs, layer(inputs))
    layer.set_weights([np.full((1, 1, 3, 2), 10.0, np.float32), np.array([-6.0, -12.0], np.float32)])
    model.save(run / "best.keras")
    (run / "status.json").write_text(json.dumps({"state": "finished"}))
    return run


def test_submit_writes_a_valid_csv_and_picture_whose_score_matches_the_labels(tmp_path, demo_root):
    run = stand_in_run(tmp_path, demo_root)
    result = make_submission([run], out_dir=tmp_path / "subs", progress=False)
    assert result.csv.parent == tmp_path / "subs" and result.csv.name.startswith(f"demo-{run.name}-")
    assert result.sheet is not None and result.sheet.suffix == ".png" and result.sheet.stat().st_size > 0
    ids = [make_demo_image(5, "test", n).id for n in range(3)]
    frame = pd.read_csv(result.csv, dtype=str, keep_default_na=False)
    assert set(frame["ImageId"]) == set(ids)

    # The same submission through the command line: submit (newest run), validate, evaluate.
    assert cli.main(["submit", "--dataset", "demo", "--set", f"train.runs_dir={tmp_path / 'runs'}",
                     "--out-dir", str(tmp_path / "cli"), "--quiet"]) == 0
    written = next((tmp_path / "cli").glob("*.csv"))
    assert cli.main(["validate", str(written), "--data", str(demo_root)]) == 0
    per_image = tmp_path / "scores.csv"
    assert cli.main(["evaluate", str(written), str(demo_root / "stage1_solution.csv"), "--data", str(demo_root),
                     "--per-image", str(per_image)]) == 0
    scores = pd.read_csv(per_image)
    # Direct score: the generator's own label images against the labels the CSV encodes.
    truths = {image.id: image.labels for image in (make_demo_image(5, "test", n) for n in range(3))}
    predicted = read_targets(written, get_format("dsb_instances"), {i: t.shape for i, t in truths.items()})
    direct = {i: iou_map(truth, predicted[i]) for i, truth in truths.items()}
    assert dict(zip(scores["id"], scores["score"])) == pytest.approx(direct, abs=1e-12)


def test_submit_prefers_tuned_postprocessing_and_explicit_overrides(tmp_path, demo_root):
    run = stand_in_run(tmp_path, demo_root)
    (run / "postprocess.json").write_text(json.dumps({"params": {"threshold": 0.7, "min_size": 3}}))
    result = make_submission([run], out_dir=tmp_path / "subs", progress=False,
                             overrides=["postprocess.min_size=20", "submission.sheet_images=0"])
    assert result.postprocess["threshold"] == 0.7 and result.postprocess["min_size"] == 20
    assert result.sheet is None


def test_submit_to_another_test_folder_and_refuse_an_invalid_file(tmp_path, demo_root, monkeypatch):
    import shutil

    from kseg.submission import make as submit

    run = stand_in_run(tmp_path, demo_root)
    other = tmp_path / "other_test"
    first = sorted((demo_root / "stage1_test").iterdir())[0]
    shutil.copytree(first, other / first.name)
    result = make_submission([run], test_dir=other, out_dir=tmp_path / "subs", progress=False)
    assert set(pd.read_csv(result.csv, dtype=str, keep_default_na=False)["ImageId"]) == {first.name}

    real_rows = submit.prediction_rows
    monkeypatch.setattr(submit, "prediction_rows", lambda *a, **k: real_rows(*a, **k) + [(a[0], "1 0")])
    code = cli.main(["submit", "--run", str(run), "--test-dir", str(other), "--out-dir", str(tmp_path / "bad"),
                     "--quiet"])
    assert code == 2, "a submission that fails validation must not report success"


def test_kaggle_upload_fails_without_the_cli_and_calls_it_otherwise(monkeypatch, tmp_path):
    import subprocess

    from kseg.submission import kaggle as submit

    calls = []
    fake_run = lambda args, check: calls.append(args) or subprocess.CompletedProcess(args, 0)  # noqa: E731
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(submit.shutil, "which", lambda name: None)
    with pytest.raises(KsegError, match="no kaggle command on the PATH.*written and valid but not uploaded"):
        submit.kaggle_submit(tmp_path / "x.csv", "some-competition", "m")
    assert calls == []
    monkeypatch.setattr(submit.shutil, "which", lambda name: "/usr/bin/kaggle")
    assert submit.kaggle_submit(tmp_path / "x.csv", "some-competition", "m") is True
    assert calls == [["/usr/bin/kaggle", "competitions", "submit", "-c", "some-competition", "-f",
                      str(tmp_path / "x.csv"), "-m", "m"]]


def test_submitting_from_an_unfinished_run_warns(tmp_path, demo_root, caplog):
    import json
    import logging

    run = stand_in_run(tmp_path, demo_root)
    (run / "status.json").write_text(json.dumps({"state": "running"}))
    logger = logging.getLogger("kseg")
    logger.addHandler(caplog.handler)
    try:
        make_submission([run], out_dir=tmp_path / "subs", progress=False)
    finally:
        logger.removeHandler(caplog.handler)
    assert f"run {run} is unfinished (its training stopped)" in caplog.text
