"""``kseg cv`` end to end on the tiny demo: three folds, the process killed (SIGKILL) while it trains
the second fold, then rerun. The first fold is not retrained; the out-of-fold (OOF) predictions
cover every training image exactly once; the saved OOF score is the one recomputed from the saved
files with the public metric; an image's OOF prediction is what its own fold's checkpoint predicts
(a model that never trained on it); tuning on OOF and ``kseg submit --cv`` work."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_fit import _flat, tiny_config  # noqa: E402

from kseg.app.cv import cv_folder  # noqa: E402
from kseg.core.runs import run_config  # noqa: E402
from kseg.data.pipeline import train_reader  # noqa: E402
from kseg.metrics import iou_map  # noqa: E402
from kseg.submission.formats import get_format  # noqa: E402
from kseg.tasks.base import load_run  # noqa: E402
from kseg.tasks.semantic.postprocess import probabilities_to_target  # noqa: E402
from kseg.tasks.semantic.predictor import Predictor  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def kseg_command(cfg, name: str, *extra: str) -> list[str]:
    sections = ("preprocess", "train", "generator", "model", "split", "dataset", "postprocess", "predict")
    overrides = [f"--set={key}={value}" for key, value in _flat(cfg.to_dict(), sections)]
    return [sys.executable, "-m", "kseg", name, "--dataset", "demo", *overrides, *extra]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def epochs_logged(run: Path) -> int:
    history = run / "history.csv"
    if not history.is_file():
        return 0
    with open(history) as f:
        return len(list(csv.DictReader(f)))


def test_cv_killed_in_the_second_fold_resumes_and_keeps_honest_oof(demo_root, tmp_path):
    cfg = tiny_config(demo_root, tmp_path, "split.n_folds=3", "train.epochs=3", "train.deterministic=true",
                      "predict.tta=flips", "postprocess.method=components")
    folder = cv_folder(cfg)
    first, second = folder / "fold-0", folder / "fold-1"

    job = subprocess.Popen(kseg_command(cfg, "cv", "--quiet"), cwd=tmp_path, env=environment(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while epochs_logged(second) < 1:  # the second fold has finished an epoch: kill it mid-fold
        assert job.poll() is None, job.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the second fold never started"
        time.sleep(0.2)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert (folder / "oof" / "fold-0.npz").is_file() and not (folder / "oof" / "fold-1.npz").exists()
    assert json.loads((folder / "cv.json").read_text())["folds_done"] == [0]  # recorded as the fold ended
    fold0_checkpoint, fold0_history = digest(first / "last.keras"), (first / "history.csv").read_text()

    done = subprocess.run(kseg_command(cfg, "cv", "--quiet"), cwd=tmp_path, env=environment(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "out-of-fold iou_map on 10 images" in done.stdout
    # The first fold was not retrained; the second resumed and logged each epoch once.
    assert digest(first / "last.keras") == fold0_checkpoint
    assert (first / "history.csv").read_text() == fold0_history
    assert [epochs_logged(folder / f"fold-{k}") for k in range(3)] == [3, 3, 3]
    assert json.loads((folder / "cv.json").read_text())["folds_done"] == [0, 1, 2]

    # Every training image is held out by exactly one fold.
    run_cfg = run_config(folder)
    held_out = {}
    for k in range(3):
        with np.load(folder / "oof" / f"fold-{k}.npz") as data:
            for i, image_id in enumerate(data["ids"]):
                held_out.setdefault(str(image_id), []).append((k, data[f"p{i}"]))
    train_ids = sorted(train_reader(run_cfg).ids())
    assert sorted(held_out) == train_ids and all(len(v) == 1 for v in held_out.values())

    # The saved score is the one recomputed from the saved files with the public metric.
    scores = json.loads((folder / "oof.json").read_text())
    reader = train_reader(run_cfg)
    fmt = get_format(run_cfg.submission.format)
    recomputed = []
    for image_id, [(_, stored)] in held_out.items():
        probabilities = stored.astype(np.float32) / 255
        labels = probabilities_to_target(probabilities, fmt, scores["postprocess"],
                                         run_cfg.generator.targets)
        recomputed.append(iou_map(reader.load(image_id).target, labels))
    assert scores["images"] == 10
    assert scores["score"] == pytest.approx(float(np.mean(recomputed)), abs=1e-12)
    assert sum(g["images"] for g in scores["groups"].values()) == 10

    # One image's OOF prediction is its own fold's last checkpoint predicting it afresh.
    image_id, [(fold, stored)] = next(iter(held_out.items()))
    member = load_run(folder / f"fold-{fold}", checkpoint="last")
    fresh = Predictor([member]).predict(reader.load(image_id).image)
    np.testing.assert_array_equal(np.round(np.clip(fresh, 0, 1) * 255).astype(np.uint8), stored)
    with open(folder / f"fold-{fold}" / "config.yaml") as f:
        assert f"fold: {fold}" in f.read()

    # Tuning on every OOF prediction, then a fold ensemble submission that validates.
    tuned = subprocess.run([sys.executable, "-m", "kseg", "tune", "--cv", str(folder), "--quiet",
                            "--thresholds", "0.4,0.5", "--min-sizes", "0,8"], cwd=tmp_path, env=environment(),
                           capture_output=True, text=True, timeout=300)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "out-of-fold images of folds [0, 1, 2]" in tuned.stdout
    record = json.loads((folder / "postprocess.json").read_text())
    assert record["images"] == 10 and record["score"] >= record["config_score"]
    submitted = subprocess.run([sys.executable, "-m", "kseg", "submit", "--cv", str(folder), "--quiet",
                                "--out-dir", str(tmp_path / "subs")], cwd=tmp_path, env=environment(),
                               capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert "valid" in submitted.stdout and "fold-2" in submitted.stdout
    assert f"'threshold': {record['params']['threshold']}" in submitted.stdout

    # The Python API takes the CV folder: the folds' ensemble with the OOF-tuned post-processing.
    import kseg

    test_image = sorted((demo_root / "stage1_test").rglob("*.png"))[0]
    predicted = kseg.predict(folder, [test_image], progress=False)[test_image.stem]
    members = [load_run(folder / f"fold-{k}", checkpoint=str(run_cfg.predict.checkpoint)) for k in range(3)]
    from kseg.io.sample import read_image

    probabilities = Predictor(members).predict(read_image(test_image))
    expected = probabilities_to_target(probabilities, fmt, {**scores["postprocess"], **record["params"]},
                                       run_cfg.generator.targets)
    np.testing.assert_array_equal(predicted > 0, expected > 0)
    assert predicted.max() == expected.max()
