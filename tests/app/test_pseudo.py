"""A pseudo-label round on the tiny demo: the test set's ground truth is made unreadable first, the
pseudo-labels are the fold ensemble's post-processed predictions with unconfident pixels weighted
0, they train in every fold and never validate, and the new round's OOF covers the real images only."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_fit import tiny_config  # noqa: E402

from kseg.app.cv import cross_validate, read_oof  # noqa: E402
from kseg.app.pseudo import pseudo_round  # noqa: E402
from kseg.core.runs import run_config  # noqa: E402
from kseg.data.pipeline import preprocess_train, train_reader  # noqa: E402
from kseg.io.sample import read_image  # noqa: E402
from kseg.submission.formats import get_format  # noqa: E402
from kseg.tasks.base import load_run  # noqa: E402
from kseg.tasks.semantic.postprocess import probabilities_to_target  # noqa: E402
from kseg.tasks.semantic.predictor import Predictor  # noqa: E402

pytestmark = pytest.mark.slow


def test_a_pseudo_label_round_never_reads_hidden_labels(demo_root, tmp_path):
    root = tmp_path / "demo"
    shutil.copytree(demo_root, root)
    cfg = tiny_config(root, tmp_path, "split.n_folds=2", "train.epochs=2", "predict.tta=none")
    first = cross_validate(cfg, progress=False)

    # The test set's ground truth: moved away, and a folder left at its path, so reading it fails.
    solution = root / "stage1_solution.csv"
    vault = tmp_path / "vault.csv"
    solution.rename(vault)
    solution.mkdir()
    test_dir = root / "stage1_test"
    assert not list(test_dir.rglob("masks")), "the demo's test folders hold images only"

    second = pseudo_round(first.folder, test_dir, low=0.2, high=0.8, min_confident=0.0, progress=False)
    assert solution.is_dir() and not any(solution.iterdir())
    assert second.folder != first.folder
    new_cfg = run_config(second.folder)
    pseudo = Path(new_cfg.dataset.pseudo)
    manifest = json.loads((pseudo / "pseudo.json").read_text())
    test_images = sorted(test_dir.glob("*/images/*.png"))
    assert sorted(manifest["images"]) == sorted(p.stem for p in test_images) and manifest["kept"] == 2

    # A pseudo-label is the fold ensemble's prediction, post-processed with the first round's settings;
    # its confident pixels are those at most 0.2 or at least 0.8.
    cfg0 = run_config(first.folder)
    members = [load_run(first.folder / f"fold-{k}", checkpoint=str(cfg0.predict.checkpoint)) for k in range(2)]
    image_path = test_images[0]
    probabilities = Predictor(members).predict(read_image(image_path))
    with np.load(pseudo / manifest["images"][image_path.stem]["file"]) as data:
        stored_target, stored_confident = data["target"], data["confident"]
    foreground = probabilities[..., 0]
    np.testing.assert_array_equal(stored_confident, ((foreground <= 0.2) | (foreground >= 0.8)).astype(np.uint8))
    expected = probabilities_to_target(probabilities, get_format(cfg0.submission.format), first.scores["postprocess"],
                                       cfg0.generator.targets)
    np.testing.assert_array_equal(stored_target, expected)
    assert 0 < stored_confident.mean() < 1, "a 2-epoch model should be unsure somewhere, or the weights prove nothing"

    # Unconfident pixels carry no loss; confident ones do.
    data = preprocess_train(new_cfg)
    weight = data.load(f"pseudo/{image_path.stem}")["weight"]
    assert np.all(weight[stored_confident == 0] == 0) and np.all(weight[stored_confident == 1] > 0)

    # Pseudo-labelled images trained in both folds and were never validated: OOF is the real images.
    real = sorted(train_reader(cfg0).ids())
    oof = sorted(i for k in range(2) for i in read_oof(second.folder / "oof" / f"fold-{k}.npz"))
    assert oof == real and second.scores["images"] == len(real) == 10
    for k in range(2):
        results = json.loads((second.folder / f"fold-{k}" / "results.json").read_text())
        assert results["train_images"] == 5 + 2 and results["valid_images"] == 5
