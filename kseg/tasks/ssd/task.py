"""SSD boxes as a task (``model: ssd``).

A box layout (``voc``, ``coco``, ``box_csv``) is read directly; an instance-mask layout (the
demo, DSB 2018) is preprocessed as usual and its boxes derived from the label images. Images are
resized to the model's fixed input and detections mapped back to each image's own pixels, as
pixel corner boxes ``(x_min, y_min, x_max, y_max)`` (:mod:`kseg.core.boxes`). Monitor: validation
VOC mAP@0.5 (``val_map50``, with ``val_coco_map`` beside it); baseline: Otsu + connected-component
boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from kseg.core.boxes import pixel_boxes
from kseg.core.config import Config
from kseg.core.errors import ConfigError
from kseg.core.pictures import draw_boxes
from kseg.data.generator import batch_options
from kseg.data.masks import otsu_baseline
from kseg.data.pipeline import preprocess_train, train_reader
from kseg.data.preprocess import to_channels
from kseg.data.split import fold_strata
from kseg.io.boxes import boxes_from_labels
from kseg.io.sample import ImageDecoder
from kseg.metrics.detection import truth_entry
from kseg.metrics.evaluators import DetectionScore
from kseg.nn.callbacks import TensorBoardPictures
from kseg.nn.predict import detections_per_image, input_size
from kseg.nn.registry import build_model
from kseg.tasks.base import Built, LoadedModel, Task, register_task
from kseg.tasks.ssd.batches import (
    DetectionBatches,
    InstanceBoxSource,
    detection_augmentation,
)
from kseg.tasks.ssd.model import (
    ssd_default_boxes_for,
    ssd_inference_model,
    ssd_training_model,
)


def build_detector(cfg: Config, channels: int, n_classes: int):
    """(network, inference model, training model, default boxes) from one set of options.

    ``model.args`` go to the builder (``n_classes`` defaults to the data's classes + background);
    the default boxes are built from the same options, so the heads and boxes cannot disagree.
    """
    if cfg.model.name != "ssd":
        raise ConfigError(f"model {cfg.model.name!r} is not a box detector (detectors: ssd)")
    args = dict(cfg.model.args or {})
    args.setdefault("n_classes", n_classes)
    if int(args["n_classes"]) != n_classes:
        raise ConfigError(f"model.args.n_classes={args['n_classes']} but the data has {n_classes - 1} class(es) "
                          "+ background")
    size = input_size(cfg)
    network = build_model("ssd", input_shape=(*size, channels), **args)
    boxes = ssd_default_boxes_for(size, **{k: args[k] for k in ("backbone", "aspect_ratios", "min_scale", "max_scale")
                                           if k in args})
    d = cfg.detection
    inference = ssd_inference_model(network, boxes, max_output=int(d.max_detections), iou_threshold=float(d.nms_iou),
                                    score_threshold=float(d.score_threshold))
    training = ssd_training_model(network, boxes, loss=str(d.loss), **dict(d.loss_args or {}))
    return network, inference, training, boxes


def predict_detections(model: keras.Model, images: Sequence[np.ndarray], batch_size: int = 8) -> list[dict]:
    """Detections of uint8 H x W x C images of any size, in each image's own pixels.

    Returns one dict per image: ``boxes`` (K, 4) (x_min, y_min, x_max, y_max), ``scores`` (K,),
    ``labels`` (K,) (1..C), the format of :mod:`kseg.metrics.detection`.
    """
    return [{"boxes": pixel_boxes(found["boxes"], *image.shape[:2]), "scores": found["scores"].astype(np.float32),
             "labels": found["classes"].astype(np.int64)}
            for image, found in detections_per_image(model, images, batch_size)]


def otsu_boxes(image: np.ndarray, min_size: int = 8) -> dict:
    """The classical baseline: boxes of Otsu + connected components, scored by component area
    (larger blobs first), one class."""
    labels = otsu_baseline(image, min_size=min_size)
    boxes, ids = boxes_from_labels(labels)
    areas = np.bincount(labels.ravel())[ids] if len(ids) else np.zeros(0)
    return {"boxes": boxes, "scores": areas.astype(np.float32) / max(1, labels.size),
            "labels": np.ones(len(boxes), np.int64)}


class TensorBoardBoxes(TensorBoardPictures):
    """Validation images with truth (red) and predicted (green) boxes."""

    def __init__(self, inference_model, log_dir, images, truths, every: int = 1, max_images: int = 4,
                 min_score: float = 0.3):
        super().__init__(log_dir, every)
        self.inference_model = inference_model
        self.samples = list(zip(images, truths))[:max_images]
        self.min_score = float(min_score)

    def pictures(self):
        found = predict_detections(self.inference_model, [image for image, _ in self.samples])
        return [(f"validation/{index}: truth red | detections >= {self.min_score:g} green",
                 draw_boxes(image, truth, detections, self.min_score))
                for index, ((image, truth), detections) in enumerate(zip(self.samples, found))]


@register_task
class SsdTask(Task):
    """SSD on boxes (see the module notes)."""

    name = "detection"
    kind = "boxes"
    tuning_hint = ("run {run} is a box detector ({model}): there are no mask post-processing settings to tune; "
                   "its NMS settings are detection.nms_iou / detection.score_threshold")

    def prepare(self):
        """The training data as a box source, with the strata of the folds."""
        reader = train_reader(self.cfg)
        if getattr(reader, "kind", None) == "boxes":
            self.source = reader
            return reader.ids(), None
        data = self.data = preprocess_train(self.cfg)
        self.source = InstanceBoxSource(data)
        return list(data.ids), fold_strata(self.cfg, data)

    def build(self, train_ids, valid_ids) -> Built:
        cfg, d = self.cfg, self.cfg.detection
        size = input_size(cfg)
        _, inference, training, default_boxes = build_detector(cfg, int(cfg.preprocess.channels),
                                                               len(self.source.class_names))
        batches = DetectionBatches(
            self.source, train_ids, input_size=size, default_boxes=default_boxes,
            iou_threshold=float(d.iou_threshold), batch_size=int(cfg.generator.batch_size), shuffle=True,
            augment=detection_augmentation(cfg.augment.pipeline, size, train=True, crop_scale=tuple(d.crop_scale),
                                           min_visibility=float(d.min_visibility), seed=int(cfg.generator.seed),
                                           seeding=cfg.augment.seeding),
            **batch_options(cfg))
        return Built(inference, training, batches, description=f"{len(default_boxes)} default boxes")

    def validation(self, valid_ids):
        samples = [self.source.load(i) for i in valid_ids]
        images = [s.image if s.image.ndim == 3 else s.image[..., None] for s in samples]
        return images, [truth_entry(s.boxes, s.labels, s.ignore) for s in samples]

    def evaluator(self) -> DetectionScore:
        return DetectionScore()

    def predict_many(self, model, images):
        return predict_detections(model, images)

    def callbacks(self, inference, logs_dir: Path, images, truths):
        return [TensorBoardBoxes(inference, logs_dir, images, truths, every=int(self.cfg.train.image_every))]

    def baselines(self, images, truths):
        return {"otsu": [otsu_boxes(image, int(self.cfg.postprocess.min_size)) for image in images]}

    # -- submission -------------------------------------------------------------------------------
    def check_format(self, fmt, runs, formats=()):
        if not fmt.boxes:
            box_formats = ", ".join(f.name for f in formats if f.boxes)
            raise ConfigError(f"run {runs[0].name} is a box detector ({self.cfg.model.name}) but submission.format "
                              f"{fmt.name} holds masks; use a box format ({box_formats})")
        if len(runs) > 1:
            raise ConfigError("box runs cannot be averaged (that needs box fusion); submit one run")

    def submission(self, members: Sequence[LoadedModel], fmt, overrides=()):
        return BoxSubmission(self.cfg, members[0])


class BoxSubmission:
    """Test images -> boxes in each image's pixels; the contact sheet draws them."""

    postprocess: dict = {}
    num_classes = None

    def __init__(self, cfg: Config, member: LoadedModel):
        self.channels = int(cfg.preprocess.channels)
        self.images = ImageDecoder(cfg.preprocess.intensity,  # as the run's training images were
                                   cfg.preprocess.get("modality", "keep"))
        self.model = member.model

    def read(self, path: Path) -> np.ndarray:
        return to_channels(self.images.read(path), self.channels)

    def predict(self, image: np.ndarray) -> dict:
        return predict_detections(self.model, [image])[0]

    def panel(self, image: np.ndarray, target: dict):
        picture = draw_boxes(image, None, target)  # letterboxed with no outlines
        return picture, np.zeros(picture.shape[:2], np.int32)
