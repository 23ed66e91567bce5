"""Detectors in the pipeline -- SSD boxes and Mask R-CNN instances: models from a config,
prediction on original-size images, validation scores, TensorBoard pictures and the classical
box baseline.

Images are resized to the model's fixed input (default boxes and anchors depend on it) and the
predictions are mapped back to each image's own pixels: SSD boxes become pixel corner boxes
``(x_min, y_min, x_max, y_max)`` as in :mod:`kseg.detection_metrics`; Mask R-CNN masks are pasted
into a label image of the original size (:func:`kseg.models.maskrcnn_heads.paste_masks`), scored
with the DSB IoU-mAP like the segmentation models.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import keras
import numpy as np

from kseg import detection_metrics
from kseg.callbacks import TensorBoardPictures, ValidationScore, sync_weights
from kseg.config import Config
from kseg.data.detection_batches import pixel_boxes
from kseg.errors import ConfigError


def input_size(cfg: Config) -> tuple[int, int]:
    size = cfg.detection.input_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2:
        raise ConfigError(f"detection.input_size must be [height, width], got {cfg.detection.input_size}")
    return int(size[0]), int(size[1])


def build_detector(cfg: Config, channels: int, n_classes: int):
    """(network, inference model, training model, default boxes) from one set of options.

    ``model.args`` go to the builder (``n_classes`` defaults to the data's classes + background);
    the default boxes are built from the same options, so the heads and boxes cannot disagree.
    """
    from kseg.models import build_model
    from kseg.models.ssd import ssd_default_boxes_for, ssd_inference_model, ssd_training_model

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


def model_input_size(model: keras.Model) -> tuple[int, int]:
    shape = model.inputs[0].shape
    return int(shape[1]), int(shape[2])


def predict_detections(model: keras.Model, images: Sequence[np.ndarray], batch_size: int = 8) -> list[dict]:
    """Detections of uint8 H x W x C images of any size, in each image's own pixels.

    Returns one dict per image: ``boxes`` (K, 4) (x_min, y_min, x_max, y_max), ``scores`` (K,),
    ``labels`` (K,) (1..C), the format of :mod:`kseg.detection_metrics`.
    """
    return [{"boxes": pixel_boxes(found["boxes"], *image.shape[:2]), "scores": found["scores"].astype(np.float32),
             "labels": found["classes"].astype(np.int64)}
            for image, found in _detections_per_image(model, images, batch_size)]


def _detections_per_image(model: keras.Model, images: Sequence[np.ndarray], batch_size: int):
    """``(image, outputs)`` per image: the images resized to the model's input and predicted in
    batches, each output cut to the image's ``valid`` detections (boxes stay normalised)."""
    height, width = model_input_size(model)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = np.stack([_resized(image, height, width) for image in chunk]).astype(np.float32) / 255
        out = model.predict_on_batch(batch)  # a compiled call: eager NMS is several times slower
        for row, image in enumerate(chunk):
            n = int(out["valid"][row])
            yield image, {key: value[row, :n] for key, value in out.items() if key != "valid"}


def _resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    out = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if image.shape[0] > height
                     else cv2.INTER_LINEAR)
    return out if out.ndim == 3 else out[..., None]


def truth_entry(boxes, labels, ignore=None) -> dict:
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": np.asarray(labels, np.int64),
            "ignore": None if ignore is None else np.asarray(ignore, bool)}


def score_detections(detections: Sequence[dict], truths: Sequence[dict]) -> dict[str, float]:
    """VOC mAP@0.5 and COCO mAP@[.5:.95] of a validation set (0 when it holds no object)."""
    try:
        return {"map50": detection_metrics.voc_map(detections, truths),
                "coco_map": detection_metrics.coco_map(detections, truths, max_dets=max(
                    [100] + [len(d["boxes"]) for d in detections]))}
    except ValueError:  # no truth box in the whole set: mAP undefined
        return {"map50": 0.0, "coco_map": 0.0}


def otsu_boxes(image: np.ndarray, min_size: int = 8) -> dict:
    """The classical baseline: boxes of Otsu + connected components, scored by component area
    (larger blobs first), one class."""
    from kseg.io.boxes import boxes_from_labels
    from kseg.postprocess import otsu_baseline

    labels = otsu_baseline(image, min_size=min_size)
    boxes, ids = boxes_from_labels(labels)
    areas = np.bincount(labels.ravel())[ids] if len(ids) else np.zeros(0)
    return {"boxes": boxes, "scores": areas.astype(np.float32) / max(1, labels.size),
            "labels": np.ones(len(boxes), np.int64)}


class DetectionScore(keras.callbacks.Callback):
    """Adds ``val_map50`` (VOC mAP@0.5, the monitor) and ``val_coco_map`` to the epoch logs."""

    def __init__(self, inference_model: keras.Model, images: Sequence[np.ndarray], truths: Sequence[dict],
                 every: int = 1):
        super().__init__()
        self.inference_model = inference_model
        self.images = list(images)
        self.truths = list(truths)
        self.every = max(1, int(every))
        self.last: dict[str, float] = {}

    def evaluate(self) -> dict[str, float]:
        return score_detections(predict_detections(self.inference_model, self.images), self.truths)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if epoch % self.every == 0 or not self.last:
            sync_weights(self)
            self.last = self.evaluate()
        logs.update({f"val_{k}": v for k, v in self.last.items()})


_TRUTH, _PREDICTED = (255, 64, 64), (64, 255, 64)


def draw_boxes(image: np.ndarray, truth: dict | None, detections: dict, min_score: float = 0.3) -> np.ndarray:
    """uint8 RGB picture: truth boxes red, detections with a score >= ``min_score`` green."""
    rgb = image if image.ndim == 3 and image.shape[2] == 3 else np.repeat(image.reshape(*image.shape[:2], 1), 3, 2)
    rgb = np.ascontiguousarray(rgb, np.uint8).copy()
    if truth is not None:
        for x0, y0, x1, y1 in np.round(truth["boxes"]).astype(int):
            cv2.rectangle(rgb, (x0, y0), (x1 - 1, y1 - 1), _TRUTH, 1)
    shown = detections["scores"] >= min_score
    for x0, y0, x1, y1 in np.round(detections["boxes"][shown]).astype(int):
        cv2.rectangle(rgb, (x0, y0), (x1 - 1, y1 - 1), _PREDICTED, 1)
    return rgb


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


# -- Mask R-CNN -------------------------------------------------------------------------------------
def build_instance_detector(cfg: Config, channels: int):
    """(inference model, training model, anchors) of ``cfg``'s Mask R-CNN, one class + background
    unless ``model.args.n_classes`` says otherwise."""
    from kseg.models import build_model
    from kseg.models.maskrcnn import maskrcnn_training_model

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
    from kseg.models.maskrcnn_heads import paste_masks

    return [paste_masks(found["boxes"], found["masks"], found["scores"], image.shape[:2], threshold=mask_threshold,
                        min_size=min_size)
            for image, found in _detections_per_image(model, images, batch_size)]


class InstanceScore(ValidationScore):
    """Adds ``val_iou_map`` (the DSB 2018 metric on pasted label images) to the epoch logs."""

    def __init__(self, inference_model, images, truths, mask_threshold: float = 0.5, min_size: int = 1,
                 every: int = 1):
        super().__init__(inference_model, images, truths, score=None, name="iou_map", every=every)
        self.mask_threshold, self.min_size = float(mask_threshold), int(min_size)

    def evaluate(self) -> float:
        from kseg.metrics import iou_map

        predicted = predict_instances(self.inference_model, self.images, self.mask_threshold, self.min_size)
        return float(np.mean([iou_map(truth, labels) for truth, labels in zip(self.truths, predicted)]))


class TensorBoardInstances(TensorBoardPictures):
    """Validation images with the true and the predicted instance outlines side by side."""

    def __init__(self, inference_model, log_dir, images, truths, mask_threshold: float = 0.5, every: int = 1,
                 max_images: int = 4):
        super().__init__(log_dir, every)
        self.inference_model = inference_model
        self.samples = list(zip(images, truths))[:max_images]
        self.mask_threshold = float(mask_threshold)

    def pictures(self):
        from kseg.submit import outline_panel

        predicted = predict_instances(self.inference_model, [image for image, _ in self.samples],
                                      self.mask_threshold)
        pictures = []
        for index, ((image, truth), labels) in enumerate(zip(self.samples, predicted)):
            gap = np.full((256, 4, 3), 255, np.uint8)
            row = np.concatenate([outline_panel(image, truth), gap, outline_panel(image, labels)], axis=1)
            pictures.append((f"validation/{index}: true instances | predicted instances", row))
        return pictures
