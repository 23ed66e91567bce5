"""A model family defined here, in the test, runs through the engine (train, interrupt, resume)
and the submission loop without either being edited: the proof that a family is one folder.

The toy family thresholds a 1x1-convolution foreground map into connected components: its
model registers with ``task="toy"``, its task with ``@register_task``, and nothing else in kseg
knows about it.
"""

from __future__ import annotations

import csv
import json

import keras
import numpy as np
import pytest
from skimage import measure
from test_fit import Interrupt  # the same Ctrl-C stand-in as the U-Net resume test

from kseg.core.config import load_config
from kseg.core.runs import find_resumable_run
from kseg.data.pipeline import preprocess_train
from kseg.engine.fit import train
from kseg.io.sample import read_image
from kseg.metrics.evaluators import MeanScore
from kseg.metrics.masks import iou_map
from kseg.nn.registry import register_model
from kseg.submission.make import make_submission
from kseg.tasks.base import Built, Task, register_task

pytestmark = pytest.mark.slow
CROP = 32


@register_model("toy_blobs", task="toy")
def toy_blobs(input_shape=(None, None, 3)):
    image = keras.Input(input_shape, name="image")
    probs = keras.layers.Conv2D(1, 1, activation="sigmoid", name="probs")(image)
    return keras.Model(image, probs, name="toy_blobs")


class OwnLoss(keras.layers.Layer):
    """The training graph owns its loss, as every kseg training model does."""

    def call(self, target, probs):
        self.add_loss(keras.ops.mean(keras.losses.binary_crossentropy(target, probs)))
        return probs


class ToyBatches(keras.utils.PyDataset):
    """Top-left crops of the images and their foreground, the same every epoch."""

    def __init__(self, data, ids):
        super().__init__()
        arrays = [data.load(i) for i in ids]
        self.images = np.stack([a["image"][:CROP, :CROP].astype(np.float32) / 255 for a in arrays])
        self.targets = np.stack([(a["target"][:CROP, :CROP] > 0).astype(np.float32)[..., None] for a in arrays])
        self.epochs_seen = []

    def set_epoch(self, epoch):
        self.epochs_seen.append(epoch)

    def __len__(self):
        return 2

    def __getitem__(self, index):
        rows = slice(2 * index, 2 * index + 2)
        return ({"image": self.images[rows], "target": self.targets[rows]},)


def toy_labels(probabilities: np.ndarray) -> np.ndarray:
    return measure.label(probabilities[..., 0] > 0.5, connectivity=1).astype(np.int32)


@register_task
class ToyTask(Task):
    name = "toy"
    kind = "instance"

    def prepare(self):
        self.data = preprocess_train(self.cfg)
        return list(self.data.ids), None

    def build(self, train_ids, valid_ids):
        inference = toy_blobs()
        target = keras.Input((None, None, 1), name="target")
        training = keras.Model({"image": inference.input, "target": target},
                               OwnLoss()(target, inference.output))
        return Built(inference, training, ToyBatches(self.data, train_ids), description="toy")

    def validation(self, valid_ids):
        arrays = [self.data.load(i) for i in valid_ids]
        return [a["image"].astype(np.float32) / 255 for a in arrays], [a["target"] for a in arrays]

    def evaluator(self):
        return MeanScore(iou_map, "iou_map")

    def predict_many(self, model, images):
        return [toy_labels(keras.ops.convert_to_numpy(model(image[None], training=False))[0]) for image in images]

    def baselines(self, images, truths):
        return {"nothing": [np.zeros(t.shape, np.int32) for t in truths]}

    def submission(self, members, fmt, overrides=()):
        return ToySubmission(members[0].model)


class ToySubmission:
    postprocess = {"threshold": 0.5}
    num_classes = None

    def __init__(self, model):
        self.model = model

    def read(self, path):
        return read_image(path)

    def predict(self, image):
        batch = image[None].astype(np.float32) / 255
        return toy_labels(keras.ops.convert_to_numpy(self.model(batch, training=False))[0])

    def panel(self, image, target):
        return image, target


def test_a_family_defined_in_a_test_trains_resumes_and_submits(demo_root, tmp_path):
    cfg = load_config("demo", model="toy_blobs", data_root=str(demo_root), overrides=[
        f"preprocess.cache_dir={tmp_path / 'cache'}", "preprocess.n_jobs=1", "preprocess.progress=false",
        f"train.runs_dir={tmp_path / 'runs'}", "train.epochs=3", "train.verbose=0", "train.schedule=constant",
        "split.n_folds=5", "dataset.demo=false", f"submission.dir={tmp_path / 'submissions'}"])
    assert cfg.model.name == "toy_blobs"

    with pytest.raises(KeyboardInterrupt):
        train(cfg, extra_callbacks=[Interrupt(epoch=1)])
    interrupted = find_resumable_run(cfg)
    assert interrupted is not None

    started = []
    recorder = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: started.append(epoch))
    result = train(cfg, extra_callbacks=[recorder])
    assert result.run_dir == interrupted and started == [1, 2], "the resumed run continues at epoch 1"
    assert result.monitor == "val_iou_map"
    with open(result.run_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert all(0.0 <= float(r["val_iou_map"]) <= 1.0 for r in rows)
    results = json.loads((result.run_dir / "results.json").read_text())
    assert results["val_score"] == pytest.approx(result.val_score)
    assert results["baselines"] == {"nothing": 0.0}  # no predicted object on images with objects
    assert results["train_images"] + results["valid_images"] == 10

    submission = make_submission([result.run_dir], progress=False)
    assert submission.report.images == 2 and submission.postprocess == {"threshold": 0.5}
    assert submission.sheet is not None and submission.sheet.is_file()
    # The rows are the toy model's components, as the DSB validator read them back.
    with open(submission.csv) as f:
        ids = {row["ImageId"] for row in csv.DictReader(f)}
    assert ids == {p.name for p in (demo_root / "stage1_test").iterdir()}
