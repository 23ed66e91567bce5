"""The semantic task scores what the competition scores: with preprocess.mode: pad, only the image's
own area (the padded margin is not part of any competition image)."""

from __future__ import annotations

import numpy as np
from fixtures_datasets import write_paired_dataset

from kseg.core.config import load_config
from kseg.data.split import split_ids
from kseg.tasks.base import get_task


def test_padded_samples_are_scored_on_their_own_area(tmp_path):
    truth = write_paired_dataset(tmp_path / "data" / "images", tmp_path / "data" / "masks", n=10, shape=(11, 13),
                                 seed=4)
    cfg = load_config("tgs_salt", data_root=str(tmp_path / "data"), overrides=[
        "dataset.train=images", "dataset.masks=masks", "preprocess.mode=pad", "preprocess.size=[16,16]",
        "preprocess.channels=3", "preprocess.n_jobs=1", "preprocess.progress=false",
        f"preprocess.cache_dir={tmp_path / 'cache'}", "preprocess.weight_map=balance", "split.n_folds=5"])
    task = get_task(cfg)
    ids, groups = task.prepare()
    _, valid = split_ids(cfg, ids, groups)
    images, truths = task.validation(valid)
    assert all(image.shape[:2] == (16, 16) for image in images)  # predicted as the model saw them
    for sample_id, scored in zip(valid, truths):
        np.testing.assert_array_equal(scored > 0, truth[sample_id][1] > 0)  # exactly the file's mask
    baselines = task.baselines(images, truths)
    assert all(p.shape == (11, 13) for predictions in baselines.values() for p in predictions)
