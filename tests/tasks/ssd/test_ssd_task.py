"""Detector data path and training: boxes follow augmentations, SSD targets per batch, a tiny SSD
trained end to end on the demo with run directory, TensorBoard boxes, resume and a box submission."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from kseg.core.boxes import normalised_boxes, pixel_boxes
from kseg.core.config import load_config
from kseg.core.pictures import draw_boxes
from kseg.io.boxes import BoxSample
from kseg.tasks.ssd.batches import (
    DetectionBatches,
    InstanceBoxSource,
    detection_augmentation,
)
from kseg.tasks.ssd.model import ssd_default_boxes_for
from kseg.metrics.detection import score_detections
from kseg.tasks.ssd.task import otsu_boxes


class ListSource:
    """A box source over in-memory samples."""

    class_names = ["background", "object"]

    def __init__(self, samples):
        self.samples = {s.id: s for s in samples}

    def ids(self):
        return sorted(self.samples)

    def load(self, sample_id):
        return self.samples[sample_id]


def square_sample(sample_id, shape, boxes):
    """A dark image with bright filled boxes (pixel corner form)."""
    image = np.full((*shape, 3), 20, np.uint8)
    for x0, y0, x1, y1 in boxes:
        image[y0:y1, x0:x1] = 220
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return BoxSample(id=sample_id, image=image, boxes=boxes, labels=np.ones(len(boxes), np.int64),
                     ignore=np.zeros(len(boxes), bool))


def test_pixel_and_normalised_boxes_are_inverse():
    boxes = np.array([[3, 5, 20, 9], [0, 0, 40, 30]], np.float32)
    model_boxes = normalised_boxes(boxes, height=30, width=40)
    np.testing.assert_allclose(model_boxes[0], [5 / 30, 3 / 40, 9 / 30, 20 / 40], rtol=1e-6)
    np.testing.assert_allclose(pixel_boxes(model_boxes, 30, 40), boxes, rtol=1e-6)


def test_boxes_follow_a_flip_and_the_resize():
    augment = detection_augmentation([{"name": "HorizontalFlip", "p": 1.0}], (32, 64), train=False)
    # train=False only resizes: check the resize first, then a training pipeline with a sure flip.
    out = augment(image=np.zeros((16, 16, 3), np.uint8), bboxes=np.array([[2, 4, 6, 12]], np.float32), labels=[1])
    np.testing.assert_allclose(out["bboxes"], [[8, 8, 24, 24]], atol=1e-4)
    flip = detection_augmentation([{"name": "HorizontalFlip", "p": 1.0}], (16, 16), train=True, crop_scale=(1.0, 1.0))
    for seed in range(4):  # either branch of the final zoom keeps the whole 16 x 16 image here
        flip.set_random_seed(seed)
        out = flip(image=np.zeros((16, 16, 3), np.uint8), bboxes=np.array([[2, 4, 6, 12]], np.float32), labels=[1])
        np.testing.assert_allclose(out["bboxes"], [[10, 4, 14, 12]], atol=1e-4)


def test_batches_hold_resized_images_and_matched_targets():
    samples = [square_sample("a", (48, 64), [(8, 8, 24, 24), (40, 20, 60, 44)]), square_sample("b", (40, 40), [])]
    size = (64, 64)
    anchors = ssd_default_boxes_for(size, "small", min_scale=0.2, max_scale=0.5)
    batches = DetectionBatches(ListSource(samples), None, input_size=size, default_boxes=anchors,
                               augment=detection_augmentation("none", size, train=False), batch_size=2,
                               shuffle=False)
    batch = batches[0]
    assert batch["image"].shape == (2, 64, 64, 3) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["target_offsets"].shape == (2, len(anchors), 4)
    assert batch["target_labels"].shape == (2, len(anchors)) and batch["target_labels"].dtype == np.int32
    # Each truth has at least its forced best default box; the empty image is all background.
    positives = np.flatnonzero(batch["target_labels"][0])
    assert len(positives) >= 2 and set(batch["target_labels"][0][positives]) == {1}
    assert not batch["target_labels"][1].any() and not batch["target_offsets"][1].any()
    # The positives sit on the objects: their default box centres fall inside a truth box.
    truth = normalised_boxes(samples[0].boxes, 48, 64)
    centres = (anchors[positives, :2] + anchors[positives, 2:]) / 2
    inside = ((centres[:, None, :] >= truth[None, :, :2]) & (centres[:, None, :] <= truth[None, :, 2:])).all(-1)
    assert inside.any(axis=1).all()


def test_augmented_batches_repeat_with_the_seed_and_drop_ignored_boxes():
    sample = square_sample("a", (64, 64), [(8, 8, 24, 24), (30, 30, 50, 50)])
    sample.ignore[1] = True
    size = (64, 64)
    anchors = ssd_default_boxes_for(size, "small", min_scale=0.2, max_scale=0.5)

    def batches(seed):
        return DetectionBatches(ListSource([sample]), None, input_size=size, default_boxes=anchors,
                                augment=detection_augmentation("microscopy", size, train=True, seed=seed),
                                batch_size=1, seed=seed, steps_per_epoch=3)

    first, again, other = batches(1), batches(1), batches(2)
    for index in range(3):
        a, b = first[index], again[index]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["target_labels"], b["target_labels"])
    assert any(not np.array_equal(first[i]["image"], other[i]["image"]) for i in range(3))
    assert all(len(first.sample(p)["boxes"]) <= 1 for p in range(3))  # the ignored box never trains


def test_instance_source_boxes_enclose_the_instances():
    labels = np.zeros((20, 30), np.int32)
    labels[2:6, 3:9] = 4
    labels[10:19, 20:29] = 7

    class Cache:
        kind = "instance"
        ids = ["x"]

        def load(self, sample_id):
            return {"image": np.zeros((20, 30, 3), np.uint8), "target": labels}

    sample = InstanceBoxSource(Cache()).load("x")
    np.testing.assert_array_equal(sample.boxes, [[3, 2, 9, 6], [20, 10, 29, 19]])
    assert sample.labels.tolist() == [1, 1]


def test_otsu_boxes_find_bright_squares_and_score_them():
    sample = square_sample("a", (64, 64), [(4, 4, 20, 20), (30, 36, 60, 60)])
    found = otsu_boxes(sample.image)
    np.testing.assert_array_equal(found["boxes"][np.argsort(found["boxes"][:, 0])], sample.boxes)
    truths = [{"boxes": sample.boxes, "labels": sample.labels}]
    assert score_detections([found], truths)["map50"] == pytest.approx(1.0)
    assert score_detections([{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)}],
                            truths)["map50"] == 0.0


def test_draw_boxes_marks_truth_red_and_detections_green():
    image = np.zeros((32, 32, 3), np.uint8)
    truth = {"boxes": np.array([[2, 2, 10, 10]], np.float32)}
    found = {"boxes": np.array([[20, 20, 30, 30], [0, 0, 5, 5]], np.float32), "scores": np.array([0.9, 0.1])}
    picture = draw_boxes(image, truth, found, min_score=0.3)
    assert tuple(picture[2, 5]) == (255, 64, 64)
    assert tuple(picture[20, 25]) == (64, 255, 64)
    assert not picture[4, 4].any()  # the low-score detection is not drawn


# -- end to end ------------------------------------------------------------------------------------
def tiny_ssd_config(demo_root, tmp_path, *extra):
    return load_config("demo", model="ssd", data_root=str(demo_root), overrides=[
        f"preprocess.cache_dir={tmp_path / 'cache'}", "preprocess.n_jobs=1", "preprocess.progress=false",
        f"train.runs_dir={tmp_path / 'runs'}", "train.epochs=3", "train.steps_per_epoch=2", "train.verbose=0",
        "train.image_every=1", "generator.batch_size=2", "detection.input_size=[64,64]", "model.args.width=4",
        "split.n_folds=5", "dataset.demo=false", f"submission.dir={tmp_path / 'submissions'}", *extra])


@pytest.mark.slow
def test_tiny_ssd_trains_scores_and_submits(demo_root, tmp_path):
    from kseg.engine.fit import train
    from kseg.submission.formats import get_format
    from kseg.submission.make import make_submission
    from kseg.submission.reading import read_box_targets
    from kseg.tasks.base import load_model

    cfg = tiny_ssd_config(demo_root, tmp_path)
    result = train(cfg)
    run = result.run_dir
    for name in ("config.yaml", "best.keras", "last.keras", "history.csv", "results.json", "status.json"):
        assert (run / name).is_file(), name
    assert list((run / "logs" / "images").glob("events.out.tfevents.*")), "no TensorBoard box pictures"
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert all(0.0 <= float(r["val_map50"]) <= 1.0 and 0.0 <= float(r["val_coco_map"]) <= 1.0 for r in rows)
    results = json.loads((run / "results.json").read_text())
    assert results["monitor"] == "val_map50" and results["val_score"] == pytest.approx(result.val_score)
    assert 0.0 < results["baselines"]["otsu_map50"] <= 1.0
    # The checkpoint is the image -> detections model, fixed-shape outputs.
    model = load_model(run / "best.keras")
    out = model(np.zeros((1, 64, 64, 3), np.float32))
    assert tuple(out["boxes"].shape) == (1, 300, 4) and tuple(out["scores"].shape) == (1, 300)

    submission = make_submission([run], progress=False)
    assert submission.report.images == 2
    rows = read_box_targets(submission.csv, get_format("wheat_boxes"))
    assert set(rows) == {p.name for p in (demo_root / "stage1_test").iterdir()}
    assert submission.sheet is not None and Path(submission.sheet).is_file()

    # A detector run refuses mask formats and mask post-processing tuning, naming what to use.
    from kseg.app.tune import tune_postprocess
    from kseg.core.errors import ConfigError

    with pytest.raises(ConfigError, match="box detector.*use a box format \\(wheat_boxes\\)"):
        make_submission([run], overrides=["submission.format=dsb_instances"], progress=False)
    with pytest.raises(ConfigError, match="cannot be averaged"):
        make_submission([run, run], progress=False)
    with pytest.raises(ConfigError, match="detection.nms_iou"):
        tune_postprocess(run)


def test_the_newest_finished_run_can_be_picked_by_model(tmp_path):
    import argparse
    import os
    import time

    from kseg.app.cli import _find_runs
    from kseg.core.errors import ConfigError

    runs = tmp_path / "runs"
    for offset, (name, state) in enumerate([("demo-unet-1", "finished"), ("demo-ssd-1", "finished"),
                                            ("demo-ssd-2", "running"), ("other-ssd-1", "finished")]):
        (runs / name).mkdir(parents=True)
        status = runs / name / "status.json"
        status.write_text(json.dumps({"state": state}))
        stamp = time.time() - 100 + offset
        os.utime(status, (stamp, stamp))

    def pick(dataset, model):
        args = argparse.Namespace(run=[], dataset=dataset, model=model, overrides=[f"train.runs_dir={runs}"])
        return _find_runs(args)[0].name

    assert pick("demo", None) == "demo-ssd-1"  # the newest finished of the dataset, whatever the model
    assert pick("demo", "unet") == "demo-unet-1"
    assert pick(None, "ssd") == "other-ssd-1"
    with pytest.raises(ConfigError, match="of model 'maskrcnn'"):
        pick("demo", "maskrcnn")
