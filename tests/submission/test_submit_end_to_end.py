"""End to end on a tiny demo competition: train -> tune -> submit -> validate -> evaluate, and the
evaluated score equals the metric computed directly from the model's label images."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kseg.app import cli
from kseg.app.evaluate import evaluate_submission
from kseg.app.tune import validation_split
from kseg.core.config import load_config
from kseg.core.runs import run_config
from kseg.engine.fit import train
from kseg.io.demo import make_demo_image, write_demo_dataset
from kseg.io.sample import read_image
from kseg.metrics.masks import iou_map
from kseg.submission.formats import get_format
from kseg.tasks.base import load_run
from kseg.tasks.semantic.postprocess import probabilities_to_target
from kseg.tasks.semantic.predictor import Predictor

pytestmark = pytest.mark.slow
SEED, N_TRAIN, N_TEST = 3, 8, 4


def test_train_tune_submit_validate_evaluate(tmp_path):
    root = write_demo_dataset(tmp_path / "demo", seed=SEED, n_train=N_TRAIN, n_test=N_TEST)
    cfg = load_config("demo", data_root=str(root), overrides=[
        f"preprocess.cache_dir={tmp_path / 'cache'}", "preprocess.n_jobs=1", "preprocess.progress=false",
        f"train.runs_dir={tmp_path / 'runs'}", "train.epochs=2", "train.steps_per_epoch=2", "train.verbose=0",
        "train.image_every=10", "generator.batch_size=2", "generator.crop_size=[32,32]", "model.args.depth=2",
        "model.args.base_filters=8", "split.n_folds=4", "dataset.demo=false", "predict.tta=flips"])
    run = train(cfg).run_dir

    assert cli.main(["tune", "--run", str(run), "--quiet", "--thresholds", "0.3,0.5", "--min-sizes", "0,8"]) == 0
    tuned = json.loads((run / "postprocess.json").read_text())
    assert tuned["images"] == 2 and tuned["score"] >= tuned["config_score"]
    # mask+border output: every separation method is tried and the saved one is the best of them.
    assert set(tuned["methods"]) == {"components", "distance", "markers"}
    assert tuned["score"] == max([tuned["config_score"]] + [m["score"] for m in tuned["methods"].values()])
    # Image groups: the demo's own record of each image's style says which are fluorescence; the
    # groups' scores, weighted by their image counts, make the overall score.
    styles = json.loads((root / "styles.json").read_text())
    _, valid_ids = validation_split(run_config(run))
    fluorescence = sum(styles[i] == "fluorescence" for i in valid_ids)
    groups = tuned["groups"]
    assert groups.get("fluorescence", {}).get("images", 0) == fluorescence
    assert sum(e["images"] for e in groups.values()) == 2
    assert sum(e["images"] * e["score"] for e in groups.values()) / 2 == pytest.approx(tuned["score"], abs=1e-12)

    out = tmp_path / "submissions"
    assert cli.main(["submit", "--run", str(run), "--out-dir", str(out), "--quiet"]) == 0
    csv = next(out.glob("*.csv"))
    assert csv.with_suffix(".png").is_file()
    assert cli.main(["validate", str(csv), "--data", str(root)]) == 0
    solution = root / "stage1_solution.csv"
    per_image = tmp_path / "per_image.csv"
    assert cli.main(["evaluate", str(csv), str(solution), "--data", str(root), "--per-image", str(per_image)]) == 0

    # Direct: the generator's label images against the model's labels, no CSV in between.
    member = load_run(run)
    post = {**dict(member.cfg.postprocess), **tuned["params"]}
    predictor = Predictor([member])
    fmt = get_format("dsb_instances")
    direct, sizes = {}, {}
    for index in range(N_TEST):
        truth = make_demo_image(SEED, "test", index)
        image = read_image(root / "stage1_test" / truth.id / "images" / f"{truth.id}.png")
        labels = probabilities_to_target(predictor.predict(image), fmt, post, member.cfg.generator.targets)
        direct[truth.id] = iou_map(truth.labels, labels)
        sizes[truth.id] = truth.labels.shape
    scores = pd.read_csv(per_image)
    assert scores["predicted_objects"].sum() > 0, "an all-empty prediction would make the comparison trivial"
    assert dict(zip(scores["id"], scores["score"])) == pytest.approx(direct, abs=1e-9)
    evaluated = evaluate_submission(csv, solution, fmt, sizes)
    assert evaluated.score == pytest.approx(float(np.mean(list(direct.values()))), abs=1e-9)
