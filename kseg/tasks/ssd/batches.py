"""Detector batches: images resized to the model's input, boxes that follow every augmentation,
and per-image SSD targets.

Why a second generator: a detector's targets are boxes matched to default boxes, not pixels, and
boxes must move with the image through crops, flips and scaling. Albumentations does that when the
``Compose`` has ``bbox_params``; boxes that lose most of their area to a crop are dropped
(``min_visibility``) instead of training the model on slivers.

Sources give :class:`kseg.io.boxes.BoxSample` items (uint8 image, pixel corner boxes
``(x_min, y_min, x_max, y_max)``, labels 1..C, ignore flags): a box reader (VOC, COCO, box CSV) or
:class:`InstanceBoxSource`, which derives the boxes of any instance-mask dataset from its cached
label images (the demo, DSB 2018). Ignored boxes are left out of training.

A batch is the dict a :func:`kseg.tasks.ssd.model.ssd_training_model` takes: ``image`` float32
B x H x W x C in [0, 1], ``target_offsets`` float32 B x N x 4, ``target_labels`` int32 B x N.
Randomness follows the segmentation generator: every choice derives from ``(seed, epoch, position)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import keras
import numpy as np

from kseg.core.boxes import normalised_boxes
from kseg.core.errors import ConfigError
from kseg.data.augment import build_augmentation, compose
from kseg.data.generator import SeededEpochs
from kseg.io.boxes import BoxSample, boxes_from_labels
from kseg.nn import box_ops
from kseg.tasks.ssd.losses import ssd_targets


class InstanceBoxSource:
    """Boxes of an instance dataset's preprocessed label images (one class, label 1)."""

    kind = "boxes"
    class_names = ["background", "object"]

    def __init__(self, data):
        if data.kind != "instance":
            raise ConfigError("a detector needs instance masks or box annotations; this dataset has "
                              "semantic masks (no objects to box)")
        self.data = data
        self._ids = list(data.ids)

    def ids(self) -> list[str]:
        return list(self._ids)

    def load(self, sample_id: str) -> BoxSample:
        arrays = self.data.load(sample_id)
        boxes, _ = boxes_from_labels(arrays["target"])
        n = len(boxes)
        return BoxSample(id=sample_id, image=arrays["image"], boxes=boxes, labels=np.ones(n, np.int64),
                         ignore=np.zeros(n, bool))


def box_safe_transforms(pipeline: str | Sequence[Mapping[str, Any]] | None) -> list[A.BasicTransform]:
    """The augmentation preset without what inflates boxes (free rotation, elastic warps).

    A box rotated by 45 degrees becomes a box 1.4 times as wide, so detector presets keep only
    right-angle turns; an explicit transform list is used as given.
    """
    if pipeline is None or pipeline == "none":
        return []
    if not isinstance(pipeline, str):
        return list(build_augmentation(pipeline).transforms)
    flips = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]
    if pipeline == "flips":
        return flips
    if pipeline == "microscopy":
        return flips + [
            A.Affine(scale=(0.8, 1.25), translate_percent=(-0.0625, 0.0625), border_mode=cv2.BORDER_REFLECT_101,
                     p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.RandomGamma(gamma_limit=(80, 120), p=0.3),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5), p=1.0), A.GaussNoise(std_range=(0.01, 0.05), p=1.0)], p=0.3),
        ]
    if pipeline == "natural":
        return [A.HorizontalFlip(p=0.5),
                A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), border_mode=cv2.BORDER_REFLECT_101,
                         p=0.5),
                A.RandomBrightnessContrast(p=0.5)]
    raise ConfigError(f"augment.pipeline {pipeline!r} is not a preset (none, flips, microscopy, natural) "
                      "or a list of transforms")


def detection_augmentation(pipeline, input_size: tuple[int, int], *, train: bool, crop_scale=(0.3, 1.0),
                           min_visibility: float = 0.3, seed: int = 0, seeding: str = "independent") -> A.Compose:
    """Augmentation (training only) then the resize to ``input_size``, with boxes following.

    Training ends in a zoom: half of the samples are a random crop of ``crop_scale`` of the
    image's area resized to the input (small objects seen larger), the others the whole image.
    """
    height, width = (int(v) for v in input_size)
    if train:
        transforms = box_safe_transforms(pipeline) + [A.OneOf([
            A.RandomResizedCrop(size=(height, width), scale=tuple(crop_scale), ratio=(0.75, 4 / 3), p=1.0),
            A.Resize(height, width, p=1.0),
        ], p=1.0)]
    else:
        transforms = [A.Resize(height, width)]
    return compose(
        transforms,
        seeding=seeding,
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=min_visibility,
                                 clip=True, filter_invalid_bboxes=True),
        seed=seed,
    )


def numpy_targets(boxes_yxyx: np.ndarray, labels: np.ndarray, default_boxes: np.ndarray, iou_threshold: float,
                  variances) -> tuple[np.ndarray, np.ndarray]:
    """SSD targets of one image as NumPy (``kseg.tasks.ssd.losses.ssd_targets`` run eagerly)."""

    if len(boxes_yxyx) == 0:  # no object: every default box is background with zero offsets
        return np.zeros((len(default_boxes), 4), np.float32), np.zeros(len(default_boxes), np.int32)
    offsets, target_labels = ssd_targets(boxes_yxyx.astype(np.float32), labels.astype(np.int32), default_boxes,
                                         iou_threshold=iou_threshold, variances=variances)
    # np.asarray reads TF and JAX arrays alike (keras.ops.convert_to_numpy warns on TF + NumPy 2).
    return np.asarray(offsets, np.float32), np.asarray(target_labels, np.int32)


class DetectionBatches(SeededEpochs, keras.utils.PyDataset):
    """``model.fit`` batches for an SSD training model (see the module notes).

    ``source`` has ``ids()`` and ``load(id) -> BoxSample``; ``default_boxes`` are the model's
    (N, 4) normalised corner boxes. ``steps_per_epoch`` repeats samples in fresh permutations.
    """

    def __init__(self, source, ids: Sequence[str] | None, *, input_size: tuple[int, int], default_boxes: np.ndarray,
                 augment: A.Compose, batch_size: int = 8, shuffle: bool = True, seed: int = 0,
                 iou_threshold: float = 0.5, variances=box_ops.VARIANCES, steps_per_epoch: int | None = None,
                 in_memory: bool | None = None, workers: int = 1, use_multiprocessing: bool = False,
                 max_queue_size: int = 10):
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size)
        self.source = source
        self._init_epochs(source.ids() if ids is None else ids, augment=augment, batch_size=batch_size,
                          shuffle=shuffle, seed=seed, steps_per_epoch=steps_per_epoch)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.default_boxes = np.asarray(default_boxes, np.float32)
        self.iou_threshold = float(iou_threshold)
        self.variances = tuple(float(v) for v in variances)
        self._init_cache(source.load, in_memory=in_memory, loaded_bytes=lambda sample: sample.image.nbytes)

    def batch_at(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        samples = [self.sample(position, epoch) for position in self.positions(index)]
        pairs = [numpy_targets(s["boxes"], s["labels"], self.default_boxes, self.iou_threshold, self.variances)
                 for s in samples]
        return {
            "image": np.stack([s["image"] for s in samples]).astype(np.float32) * np.float32(1 / 255),
            "target_offsets": np.stack([p[0] for p in pairs]),
            "target_labels": np.stack([p[1] for p in pairs]),
        }

    def sample(self, position: int, epoch: int | None = None) -> dict[str, np.ndarray]:
        """The augmented, resized image of the ``position``-th sample of ``epoch`` (the current one by
        default) and its normalised boxes."""
        epoch = self.epoch if epoch is None else epoch
        item = self._load(self.ids[self.order(epoch)[position]])
        keep = ~np.asarray(item.ignore, bool) if item.ignore is not None else np.ones(len(item.boxes), bool)
        image = item.image if item.image.ndim == 3 else item.image[..., None]
        augment = self._thread_augment()
        augment.set_random_seed(int(np.random.SeedSequence([self.seed, epoch, position]).generate_state(1)[0]))
        out = augment(image=image, bboxes=np.asarray(item.boxes, np.float32)[keep],
                      labels=np.asarray(item.labels, np.int64)[keep])
        image = out["image"] if out["image"].ndim == 3 else out["image"][..., None]
        height, width = image.shape[:2]
        boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        return {"image": image, "boxes": normalised_boxes(boxes, height, width),
                "labels": np.asarray(out["labels"], np.int64).reshape(-1)}
