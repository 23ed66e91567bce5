"""Mask R-CNN data path, assembled model and training: instance targets from label images, RPN
targets per batch, the inference and training graphs, and a tiny run end to end (train, score,
submit through the validator)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from kseg.core.config import load_config
from kseg.tasks.maskrcnn.batches import (
    MaskRCNNBatches,
    instance_augmentation,
    instance_targets,
)
from kseg.tasks.maskrcnn.model import (
    maskrcnn,
    maskrcnn_anchors,
    maskrcnn_training_model,
)


def test_instance_targets_pad_clean_and_normalise():
    labels = np.zeros((20, 40), np.int32)
    labels[2:6, 4:12] = 7       # 32 px
    labels[10:20, 30:40] = 3    # 100 px
    labels[0, 39] = 9           # a 1-pixel sliver: erased
    boxes, class_ids, instance_ids, cleaned = instance_targets(labels, max_instances=4, min_pixels=4)
    assert boxes.shape == (4, 4) and class_ids.tolist() == [1, 1, 0, 0]
    assert instance_ids.tolist() == [3, 7, 0, 0]
    np.testing.assert_allclose(boxes[0], [10 / 20, 30 / 40, 20 / 20, 40 / 40])
    np.testing.assert_allclose(boxes[1], [2 / 20, 4 / 40, 6 / 20, 12 / 40])
    assert not boxes[2:].any() and cleaned[0, 39] == 0 and (cleaned == 7).sum() == 32


def test_instance_targets_keep_the_largest_when_there_are_too_many():
    labels = np.zeros((10, 30), np.int32)
    for k, width in enumerate((2, 5, 3, 4), start=1):
        labels[0:5, 7 * (k - 1):7 * (k - 1) + width] = k
    with pytest.warns(UserWarning, match="keeping the 2 largest"):
        _, class_ids, instance_ids, cleaned = instance_targets(labels, max_instances=2, min_pixels=1)
    assert sorted(instance_ids[class_ids > 0].tolist()) == [2, 4]
    assert set(np.unique(cleaned)) == {0, 2, 4}


class Cache:
    """A preprocessed-dataset stand-in holding two images with square nuclei."""

    kind = "instance"

    def __init__(self):
        self.arrays = {}
        for n, sample_id in enumerate(("a", "b")):
            labels = np.zeros((48, 64), np.int32)
            labels[5:15, 5:15] = 1
            labels[20:40, 30 + n:50 + n] = 2
            image = np.where(labels[..., None] > 0, 200, 30).astype(np.uint8).repeat(3, axis=2)
            self.arrays[sample_id] = {"image": image, "target": labels}
        self.ids = list(self.arrays)

    def load(self, sample_id):
        return self.arrays[sample_id]

    def path(self, sample_id):
        import pathlib

        return pathlib.Path(__file__)


def test_batches_hold_images_label_images_and_rpn_targets():
    size = (64, 64)
    anchors = maskrcnn_anchors(size)
    batches = MaskRCNNBatches(Cache(), None, input_size=size, anchors=anchors, batch_size=2, max_instances=8,
                              augment=instance_augmentation("none", size, train=False), shuffle=False,
                              rpn_options={"anchors_per_image": 64})
    batch = batches[0]
    assert batch["image"].shape == (2, 64, 64, 3) and batch["label_image"].shape == (2, 64, 64)
    assert batch["rpn_labels"].shape == (2, len(anchors)) and batch["rpn_deltas"].shape == (2, len(anchors), 4)
    assert set(np.unique(batch["rpn_labels"])) <= {-1, 0, 1} and (batch["rpn_labels"] == 1).any()
    assert ((batch["rpn_labels"] >= 0).sum(axis=1) <= 64).all()
    # Boxes are re-derived from the resized label image: each encloses its instance exactly.
    for row in range(2):
        labels = batch["label_image"][row]
        for box, instance in zip(batch["gt_boxes"][row], batch["gt_instance_ids"][row]):
            if instance == 0:
                continue
            ys, xs = np.nonzero(labels == instance)
            np.testing.assert_allclose(box, [ys.min() / 64, xs.min() / 64, (ys.max() + 1) / 64, (xs.max() + 1) / 64])
    assert batch["gt_class_ids"].tolist() == [[1, 1, 0, 0, 0, 0, 0, 0]] * 2


TINY = dict(backbone="small", width=4, fpn_channels=8, fc_channels=16, mask_channels=8, mask_convs=1,
            rpn_pre_nms=200, rpn_post_nms=50, max_detections=20)


def test_inference_model_outputs_fixed_shapes_and_training_graph_shares_weights():
    model = maskrcnn((64, 64, 3), **TINY)
    out = model.predict_on_batch(np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32))
    assert out["boxes"].shape == (2, 20, 4) and out["masks"].shape == (2, 20, 28, 28)
    assert out["scores"].shape == (2, 20) and out["valid"].shape == (2,)
    assert np.all((out["masks"] >= 0) & (out["masks"] <= 1))
    training = maskrcnn_training_model(model, rois_per_image=16, max_instances=8)
    trained = {id(w) for w in training.trainable_weights}
    assert all(id(w) in trained for w in model.trainable_weights)
    assert len(training.trainable_weights) == len(model.trainable_weights)


def test_a_tiny_maskrcnn_learns_two_squares():
    """Overfitting check: a few hundred steps on two images lower the loss a lot."""
    import keras

    size = (64, 64)
    keras.utils.set_random_seed(0)
    model = maskrcnn((*size, 3), **{**TINY, "width": 8, "fpn_channels": 16})
    training = maskrcnn_training_model(model, rois_per_image=16, max_instances=8, seed=1)
    batches = MaskRCNNBatches(Cache(), None, input_size=size, anchors=maskrcnn_anchors(size), batch_size=2,
                              max_instances=8, augment=instance_augmentation("none", size, train=False),
                              shuffle=False, rpn_options={"anchors_per_image": 64})
    batch = batches[0]
    keras.utils.set_random_seed(0)
    training.compile(optimizer=keras.optimizers.Adam(3e-3))
    first = float(training.train_on_batch(batch))
    for _ in range(150):
        last = float(training.train_on_batch(batch))
    assert np.isfinite(last) and last < 0.3 * first

    # TensorFlow's kernels (the default here) and the keras.ops twins JAX runs give the same
    # detections and instances (ties included: an overfitted model's scores saturate to equal
    # values); only the detected rows get a mask, the rest are 0.
    from kseg.nn.kernels import portable_kernels
    from kseg.tasks.maskrcnn.heads import paste_masks

    images = batch["image"]
    library = {k: np.asarray(v) for k, v in model(images).items()}
    with portable_kernels():
        portable = {k: np.asarray(v) for k, v in model(images).items()}
    valid = library["valid"]
    assert (valid >= 1).all() and (valid < 20).all()  # detections, and padding rows to skip
    np.testing.assert_array_equal(portable["valid"], valid)
    np.testing.assert_array_equal(portable["classes"], library["classes"])
    np.testing.assert_allclose(portable["boxes"], library["boxes"], atol=1e-5)
    np.testing.assert_allclose(portable["scores"], library["scores"], atol=1e-5)
    np.testing.assert_allclose(portable["masks"], library["masks"], atol=1e-4)
    for b, n in enumerate(valid):
        assert not library["masks"][b, n:].any() and not portable["masks"][b, n:].any()
        assert library["masks"][b, :n].max() > 0.5
        pasted = [paste_masks(out["boxes"][b, :n], out["masks"][b, :n], out["scores"][b, :n], size)
                  for out in (library, portable)]
        np.testing.assert_array_equal(pasted[0], pasted[1])


# -- end to end ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_maskrcnn_trains_scores_and_submits(demo_root, tmp_path):
    from kseg.engine.fit import train
    from kseg.submission.make import make_submission
    from kseg.tasks.base import load_model

    args = [f"model.args.{k}={v}" for k, v in TINY.items()]
    cfg = load_config("demo", model="maskrcnn", data_root=str(demo_root), overrides=[
        f"preprocess.cache_dir={tmp_path / 'cache'}", "preprocess.n_jobs=1", "preprocess.progress=false",
        f"train.runs_dir={tmp_path / 'runs'}", "train.epochs=2", "train.steps_per_epoch=2", "train.verbose=0",
        "train.image_every=1", "generator.batch_size=2", "detection.input_size=[64,64]",
        "detection.rois_per_image=16", "split.n_folds=5", "dataset.demo=false",
        f"submission.dir={tmp_path / 'submissions'}", *args])
    result = train(cfg)
    run = result.run_dir
    for name in ("best.keras", "last.keras", "history.csv", "results.json"):
        assert (run / name).is_file(), name
    assert list((run / "logs" / "images").glob("events.out.tfevents.*")), "no TensorBoard instance pictures"
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(0.0 <= float(r["val_iou_map"]) <= 1.0 for r in rows)
    results = json.loads((run / "results.json").read_text())
    assert results["monitor"] == "val_iou_map" and 0.0 <= results["baselines"]["otsu"] <= 1.0
    model = load_model(run / "last.keras")
    assert model.predict_on_batch(np.zeros((1, 64, 64, 3), np.float32))["masks"].shape == (1, 20, 28, 28)

    submission = make_submission([run], progress=False)
    assert submission.report.images == 2  # written and passed the DSB validator

    # make tune searches probability-map post-processing, which Mask R-CNN does not output: refused,
    # naming the settings that play that part.
    from kseg.app.tune import tune_postprocess
    from kseg.core.errors import ConfigError

    with pytest.raises(ConfigError, match="instance detector.*detection.mask_threshold"):
        tune_postprocess(run)


@pytest.mark.slow
def test_maskrcnn_trains_and_predicts_on_jax():
    from backends import run_on_jax

    run_on_jax("""
        import sys
        sys.path.insert(0, "tests/tasks/maskrcnn")
        import numpy as np, keras
        from test_maskrcnn_task import Cache, TINY
        from kseg.tasks.maskrcnn.batches import MaskRCNNBatches, instance_augmentation
        from kseg.tasks.maskrcnn.model import maskrcnn, maskrcnn_anchors, maskrcnn_training_model
        size = (64, 64)
        model = maskrcnn((*size, 3), **TINY)
        training = maskrcnn_training_model(model, rois_per_image=16, max_instances=8, seed=1)
        batch = MaskRCNNBatches(Cache(), None, input_size=size, anchors=maskrcnn_anchors(size), batch_size=2,
                                max_instances=8, augment=instance_augmentation("none", size, train=False),
                                shuffle=False, rpn_options={"anchors_per_image": 64})[0]
        training.compile(optimizer=keras.optimizers.Adam(3e-3))
        losses = [float(training.train_on_batch(batch)) for _ in range(30)]
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
        out = model.predict_on_batch(batch["image"])
        assert out["masks"].shape == (2, 20, 28, 28)
        print("ok")
    """)
