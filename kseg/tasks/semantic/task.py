"""The semantic family as a task: U-Net / FCN (any builder registered with ``task="semantic"``)
predicting per-pixel probabilities, trained through the weight-map graph.

Validation images are whole images padded to the model's divisor; probabilities become what the
competition's format writes (instance label images, a mask, class indices: the same post-processing
as ``make submit``) and the monitor is the competition's metric on it, image by image as Kaggle
scores (``train.metric: auto``; DSB IoU-mAP, TGS IoU-threshold precision, Carvana Dice, ...), or the
pixel IoU of ``train.score_class`` (``train.metric: class_iou``). Baselines, scored the same way:
all-empty, all-foreground, and Otsu + connected components.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kseg.core.config import Config
from kseg.core.errors import ConfigError
from kseg.core.formats import get_format
from kseg.data.masks import otsu_baseline
from kseg.data.pipeline import preprocess_train
from kseg.data.split import fold_strata
from kseg.io.sample import ImageDecoder
from kseg.metrics.evaluators import MeanScore
from kseg.metrics.scores import METRICS, class_iou, score_image
from kseg.nn.predict import predict_image
from kseg.nn.registry import build_model, input_divisor
from kseg.tasks.base import Built, LoadedModel, Task, register_task
from kseg.tasks.semantic.auxiliary import main_model
from kseg.tasks.semantic.batches import make_batches
from kseg.tasks.semantic.callbacks import TensorBoardImages
from kseg.tasks.semantic.postprocess import (
    gate,
    probabilities_to_target,
    resolve_postprocess,
    split_image_probability,
)
from kseg.tasks.semantic.predictor import Predictor
from kseg.tasks.semantic.training_graph import (
    CLASSIFICATION_WEIGHT,
    DEEP_SUPERVISION_WEIGHT,
    build_training_model,
)


def build_models(cfg: Config, channels: int):
    """(inference model, training model) from one builder call.

    With ``model.args.deep_supervision`` or ``classification_head`` the builder's model has
    auxiliary outputs: the training model is built on it (their losses weighted by
    ``train.deep_supervision_weight`` and ``train.classification_weight``) and the inference model
    is its one-output sibling over the same layers (``kseg.tasks.semantic.auxiliary``), the
    classification head's probability as its last channel.
    """
    args = dict(cfg.model.args or {})
    targets = cfg.generator.targets
    if targets == "classes":
        if int(args.get("n_classes", 0)) < 2 or cfg.train.loss != "ce":
            raise ConfigError("generator.targets 'classes' needs model.args.n_classes >= 2 (background "
                              "included) and a softmax loss (train.loss: ce)")
    else:
        args.pop("n_classes", None)
        args["targets"] = targets
    if args.get("classification_head") and targets == "classes":
        raise ConfigError("model.args.classification_head needs sigmoid targets (generator.targets: mask, "
                          "mask+border, ...): its image-level channel cannot ride beside softmax classes")
    model = build_model(cfg.model.name, input_shape=(None, None, channels), **args)
    loss, loss_args = cfg.train.loss, cfg.to_dict()["train"].get("loss_args") or {}
    if isinstance(loss, Mapping):  # {bce: 3, dice: 1}: loss_args hold each component's arguments
        loss, loss_args = "combined", {"weights": dict(loss), "args": loss_args}
    training = build_training_model(model, loss=loss, loss_kwargs=dict(loss_args),
                                    deep_supervision_weight=cfg.train.get("deep_supervision_weight",
                                                                          DEEP_SUPERVISION_WEIGHT),
                                    classification_weight=cfg.train.get("classification_weight", CLASSIFICATION_WEIGHT))
    return main_model(model), training


def pad_multiple(cfg: Config) -> int:
    """Validation images are padded to a multiple of the model's total stride."""
    return int(input_divisor(cfg.model.name, **dict(cfg.model.args or {})))


def _own_area(weight: np.ndarray):
    """The slice of a padded sample that is the image's own (the pad carries weight 0)."""
    rows, cols = np.flatnonzero(weight.any(axis=1)), np.flatnonzero(weight.any(axis=0))
    if rows.size == 0:
        return np.s_[:, :]
    return np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def class_count(cfg: Config, probabilities: np.ndarray) -> int:
    """Classes per image for per-class formats: ``submission.num_classes``, else the model's."""
    if cfg.submission.num_classes:
        return int(cfg.submission.num_classes)
    return probabilities.shape[-1] - 1 if cfg.generator.targets == "classes" else 1


@register_task
class SemanticTask(Task):
    """Per-pixel probabilities (see the module notes)."""

    name = "semantic"
    kind = "semantic"
    ensemble = True

    def prepare(self):
        self.data = preprocess_train(self.cfg)
        return list(self.data.ids), fold_strata(self.cfg, self.data)

    def build(self, train_ids, valid_ids) -> Built:
        cfg = self.cfg
        inference, training = build_models(cfg, int(cfg.preprocess.channels))
        self.divisor = pad_multiple(cfg)
        train_batches, valid_batches = make_batches(cfg, self.data, train_ids, valid_ids, pad_multiple=self.divisor,
                                                    output="graph")
        return Built(inference, training, train_batches, validation_data=valid_batches)

    def validation(self, valid_ids):
        """Whole preprocessed images to predict; the truths to score against. With
        ``preprocess.mode: pad`` the score covers the image's own area only (where the weight map is
        not zero): the padded margin is not the competition's, and its loss weight is 0."""
        self.valid_arrays = [self.data.load(i) for i in valid_ids]
        pad = self.cfg.preprocess.mode == "pad"
        self.valid_boxes = [_own_area(a["weight"]) if pad and "weight" in a else np.s_[:, :] for a in self.valid_arrays]
        images = [a["image"].astype(np.float32) / 255 for a in self.valid_arrays]
        truths = [a["target"][box] for a, box in zip(self.valid_arrays, self.valid_boxes)]
        return images, truths

    @property
    def metric(self) -> str:
        """The monitored metric: ``train.metric``, where ``auto`` is the competition's."""
        metric = str(self.cfg.train.metric)
        if metric == "auto":
            return get_format(self.cfg.submission.format).metric
        if metric != "class_iou" and metric not in METRICS:
            raise ConfigError(f"train.metric {metric!r} is not auto, class_iou or one of {', '.join(METRICS)}")
        return metric

    def evaluator(self) -> MeanScore:
        if self.metric == "class_iou":
            score_class = int(self.cfg.train.score_class)
            return MeanScore(functools.partial(class_iou, score_class=score_class), f"class{score_class}_iou")
        return MeanScore(functools.partial(score_image, metric=self.metric), self.metric)

    def target(self, probabilities: np.ndarray) -> np.ndarray:
        """What the monitor scores: what the format writes, or the thresholded foreground channel."""
        post = dict(self.cfg.postprocess)
        if self.metric == "class_iou":
            pixels, image_probability = split_image_probability(probabilities, self.cfg.generator.targets)
            return gate(pixels[..., 0] > float(post["threshold"]), image_probability, post.get("empty_threshold"))
        fmt = get_format(self.cfg.submission.format)
        return probabilities_to_target(probabilities, fmt, post, self.cfg.generator.targets)

    def predict_many(self, model, images):
        return [self.target(predict_image(model, image, self.divisor))[box]
                for image, box in zip(images, self.valid_boxes)]

    def callbacks(self, inference, logs_dir: Path, images, truths):
        weights = [a.get("weight", np.ones(a["target"].shape, np.float32)) for a in self.valid_arrays]
        whole_truths = [np.asarray(a["target"]) for a in self.valid_arrays]
        return [TensorBoardImages(inference, logs_dir, images, whole_truths, weights,
                                  pad_multiple=self.divisor, every=int(self.cfg.train.image_every),
                                  targets=self.cfg.generator.targets)]

    def baselines(self, images, truths):
        """All-empty, all-foreground and Otsu predictions, in the form the monitor scores."""
        own = [a["image"][box] for a, box in zip(self.valid_arrays, self.valid_boxes)]
        otsu = [otsu_baseline(image, min_size=int(self.cfg.postprocess.min_size)) for image in own]
        shapes = [image.shape[:2] for image in own]
        if self.metric == "class_iou":
            return {"otsu": [labels > 0 for labels in otsu], "empty": [np.zeros(s, bool) for s in shapes],
                    "all_foreground": [np.ones(s, bool) for s in shapes]}
        rows = get_format(self.cfg.submission.format).rows
        kind = np.int32 if rows == "instance" else np.uint8
        return {"otsu": [(labels if rows == "instance" else labels > 0).astype(kind) for labels in otsu],
                "empty": [np.zeros(s, kind) for s in shapes],
                "all_foreground": [np.ones(s, kind) for s in shapes]}

    # -- submission -------------------------------------------------------------------------------
    def check_format(self, fmt, runs, formats=()):
        if fmt.boxes:
            raise ConfigError(f"submission.format {fmt.name} holds boxes but run {runs[0].name} is a segmentation "
                              f"model ({self.cfg.model.name})")

    def submission(self, members: Sequence[LoadedModel], fmt, overrides=()):
        return SemanticSubmission(self.cfg, members, fmt, overrides)


class SemanticSubmission:
    """Test images -> probabilities (the members averaged, TTA, tiles) -> the format's target."""

    def __init__(self, cfg: Config, members: Sequence[LoadedModel], fmt, overrides=()):
        self.cfg, self.fmt = cfg, fmt
        self.postprocess = resolve_postprocess(members[0].run_dir, cfg, overrides)
        self.predictor = Predictor(members)
        self.num_classes: int | None = None
        self.probabilities: np.ndarray | None = None  # of the last predicted image (kseg predict)
        self.images = ImageDecoder(cfg.preprocess.intensity,  # as the run's training images were
                                   cfg.preprocess.get("modality", "keep"))

    def read(self, path: Path) -> np.ndarray:
        return self.images.read(path)

    def predict(self, image: np.ndarray) -> np.ndarray:
        probabilities = self.probabilities = self.predictor.predict(image)
        if self.num_classes is None:
            self.num_classes = class_count(self.cfg, probabilities)
        return probabilities_to_target(probabilities, self.fmt, self.postprocess, self.cfg.generator.targets)

    def panel(self, image: np.ndarray, target: np.ndarray):
        return image, target
