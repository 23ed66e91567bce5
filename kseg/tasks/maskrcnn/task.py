"""Mask R-CNN instances as a task (``model: maskrcnn``), on instance-mask layouts.

Images are resized to the model's fixed input; each detection's mask is pasted into a label image
of the image's own size (:func:`kseg.tasks.maskrcnn.heads.paste_masks`, overlaps go to the higher
score) and scored with the DSB IoU-mAP like the segmentation models. Monitor: ``val_iou_map``;
baseline: Otsu + connected components.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from kseg.core.config import Config
from kseg.core.errors import ConfigError
from kseg.core.pictures import outline_panel
from kseg.data.generator import batch_options
from kseg.data.masks import otsu_baseline
from kseg.data.pipeline import preprocess_train
from kseg.data.preprocess import to_channels
from kseg.data.split import fold_strata
from kseg.io.sample import ImageDecoder
from kseg.metrics.evaluators import MeanScore
from kseg.metrics.masks import iou_map
from kseg.nn.callbacks import TensorBoardPictures
from kseg.nn.predict import detections_per_image, input_size
from kseg.nn.registry import build_model
from kseg.tasks.base import Built, LoadedModel, Task, register_task
from kseg.tasks.maskrcnn.batches import MaskRCNNBatches, instance_augmentation
from kseg.tasks.maskrcnn.heads import paste_masks
from kseg.tasks.maskrcnn.model import maskrcnn_training_model


def build_instance_detector(cfg: Config, channels: int):
    """(inference model, training model, anchors) of ``cfg``'s Mask R-CNN, one class + background
    unless ``model.args.n_classes`` says otherwise."""
    args = dict(cfg.model.args or {})
    args.setdefault("max_detections", int(cfg.detection.max_detections))
    size = input_size(cfg)
    inference = build_model(cfg.model.name, input_shape=(*size, channels), **args)
    d = cfg.detection
    training = maskrcnn_training_model(inference, rois_per_image=int(d.rois_per_image),
                                       positive_fraction=float(d.positive_fraction),
                                       max_instances=int(d.max_instances), seed=int(cfg.train.seed))
    return inference, training, inference.get_layer("proposals").anchors  # the anchors the RPN predicts for


def predict_instances(model: keras.Model, images: Sequence[np.ndarray], mask_threshold: float = 0.5,
                      min_size: int = 1, batch_size: int = 4) -> list[np.ndarray]:
    """Instance label images (each image's own H x W, int32, no overlaps: higher scores win) of
    uint8 images of any size, from a Mask R-CNN inference model."""
    return [paste_masks(found["boxes"], found["masks"], found["scores"], image.shape[:2], threshold=mask_threshold,
                        min_size=min_size)
            for image, found in detections_per_image(model, images, batch_size)]


class TensorBoardInstances(TensorBoardPictures):
    """Validation images with the true and the predicted instance outlines side by side."""

    def __init__(self, inference_model, log_dir, images, truths, mask_threshold: float = 0.5, every: int = 1,
                 max_images: int = 4):
        super().__init__(log_dir, every)
        self.inference_model = inference_model
        self.samples = list(zip(images, truths))[:max_images]
        self.mask_threshold = float(mask_threshold)

    def pictures(self):
        predicted = predict_instances(self.inference_model, [image for image, _ in self.samples],
                                      self.mask_threshold)
        pictures = []
        for index, ((image, truth), labels) in enumerate(zip(self.samples, predicted)):
            gap = np.full((256, 4, 3), 255, np.uint8)
            row = np.concatenate([outline_panel(image, truth), gap, outline_panel(image, labels)], axis=1)
            pictures.append((f"validation/{index}: true instances | predicted instances", row))
        return pictures


@register_task
class MaskRCNNTask(Task):
    """Mask R-CNN on instance masks (see the module notes)."""

    name = "instance"
    kind = "instance"
    tuning_hint = ("run {run} is an instance detector ({model}): make tune searches the post-processing of "
                   "probability maps, which it does not output; its mask threshold is detection.mask_threshold, its "
                   "NMS and confidence model.args.detection_nms_iou / model.args.min_confidence")

    def prepare(self):
        self.data = preprocess_train(self.cfg)
        if self.data.kind != "instance":
            raise ConfigError("Mask R-CNN trains on instance masks; this dataset has semantic masks")
        return list(self.data.ids), fold_strata(self.cfg, self.data)

    def build(self, train_ids, valid_ids) -> Built:
        cfg, d = self.cfg, self.cfg.detection
        size = input_size(cfg)
        inference, training, anchors = build_instance_detector(cfg, int(cfg.preprocess.channels))
        batches = MaskRCNNBatches(
            self.data, train_ids, input_size=size, anchors=anchors, batch_size=int(cfg.generator.batch_size),
            shuffle=True, max_instances=int(d.max_instances),
            augment=instance_augmentation(cfg.augment.pipeline, size, train=True, crop_scale=tuple(d.crop_scale),
                                          seed=int(cfg.generator.seed), seeding=cfg.augment.seeding),
            **batch_options(cfg))
        return Built(inference, training, batches, description=f"{len(anchors)} anchors")

    def validation(self, valid_ids):
        arrays = [self.data.load(i) for i in valid_ids]
        return [a["image"] for a in arrays], [a["target"] for a in arrays]

    def evaluator(self) -> MeanScore:
        return MeanScore(iou_map, "iou_map")

    def predict_many(self, model, images):
        return predict_instances(model, images, float(self.cfg.detection.mask_threshold),
                                 int(self.cfg.postprocess.min_size))

    def callbacks(self, inference, logs_dir: Path, images, truths):
        return [TensorBoardInstances(inference, logs_dir, images, truths,
                                     mask_threshold=float(self.cfg.detection.mask_threshold),
                                     every=int(self.cfg.train.image_every))]

    def baselines(self, images, truths):
        return {"otsu": [otsu_baseline(image, min_size=int(self.cfg.postprocess.min_size)) for image in images]}

    # -- submission -------------------------------------------------------------------------------
    def check_format(self, fmt, runs, formats=()):
        if fmt.rows != "instance":
            instance_formats = ", ".join(f.name for f in formats if f.rows == "instance")
            raise ConfigError(f"run {runs[0].name} is an instance detector ({self.cfg.model.name}); submission.format "
                              f"{fmt.name} is not an instance format ({instance_formats})")
        if len(runs) > 1:
            raise ConfigError("Mask R-CNN runs cannot be averaged (that needs box / mask fusion); submit one run")

    def submission(self, members: Sequence[LoadedModel], fmt, overrides=()):
        return InstanceSubmission(self.cfg, members[0])


class InstanceSubmission:
    """Test images -> pasted instance label images (overlaps resolved by score)."""

    num_classes = None

    def __init__(self, cfg: Config, member: LoadedModel):
        self.channels = int(cfg.preprocess.channels)
        self.images = ImageDecoder(cfg.preprocess.intensity,  # as the run's training images were
                                   cfg.preprocess.get("modality", "keep"))
        self.model = member.model
        self.postprocess = {"mask_threshold": float(cfg.detection.mask_threshold),
                            "min_size": int(cfg.postprocess.min_size)}

    def read(self, path: Path) -> np.ndarray:
        return to_channels(self.images.read(path), self.channels)

    def predict(self, image: np.ndarray) -> np.ndarray:
        return predict_instances(self.model, [image], self.postprocess["mask_threshold"],
                                 self.postprocess["min_size"])[0]

    def panel(self, image: np.ndarray, target: np.ndarray):
        return image, target
