"""Mask R-CNN batches: an instance label image and its boxes, resized to the model's input, plus
the RPN targets of every image.

Why its own generator: Mask R-CNN trains from instances (boxes, classes and masks), and its region
proposal network from anchor labels. Masks travel as ONE label image per sample (the detection
target layer crops each instance out of it in the graph), so a sample costs H x W int32 however
many nuclei it holds. Boxes are re-derived from the augmented label image, so any spatial
transform (rotations included) keeps boxes and masks consistent.

A batch is the dict :func:`kseg.tasks.maskrcnn.model.maskrcnn_training_model` takes:
``image`` float32 B x H x W x C in [0, 1]; ``rpn_labels`` int32 B x A (1 / 0 / -1 ignored) and
``rpn_deltas`` float32 B x A x 4; ``gt_boxes`` float32 B x T x 4 normalised (y_min, x_min, y_max,
x_max); ``gt_class_ids`` int32 B x T (1 for a nucleus, 0 for padding); ``gt_instance_ids`` int32
B x T (the instance's value in the label image); ``label_image`` int32 B x H x W.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import albumentations as A
import keras
import numpy as np

from kseg.core.boxes import normalised_boxes
from kseg.data.augment import build_augmentation, compose
from kseg.data.generator import SeededEpochs
from kseg.io.boxes import boxes_from_labels
from kseg.tasks.maskrcnn.rpn import rpn_targets


def instance_augmentation(pipeline, input_size: tuple[int, int], *, train: bool, crop_scale=(0.3, 1.0),
                          seed: int = 0, seeding: str = "independent") -> A.Compose:
    """The segmentation preset (training only) then a zoom / resize to ``input_size``; the label
    image is a mask target, so it is resampled by nearest neighbour."""
    height, width = (int(v) for v in input_size)
    resize = A.Resize(height, width, p=1.0)
    if not train:
        return A.Compose([resize], seed=seed)
    augment = build_augmentation(pipeline)
    zoom = A.OneOf([A.RandomResizedCrop(size=(height, width), scale=tuple(crop_scale), ratio=(0.75, 4 / 3), p=1.0),
                    resize], p=1.0)
    return compose([*augment.transforms, zoom], seeding=seeding, seed=seed)


def instance_targets(labels: np.ndarray, max_instances: int, min_pixels: int = 4):
    """(boxes (T, 4) normalised, class ids (T,), instance ids (T,), cleaned label image) of a label
    image, padded to ``max_instances`` rows. Instances under ``min_pixels`` (slivers left by a
    crop) and any beyond ``max_instances`` (the largest are kept) are erased from the labels."""
    labels = np.asarray(labels)
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if ids.size:
        areas = np.bincount(np.searchsorted(ids, labels[labels > 0]), minlength=ids.size)
        keep = areas >= min_pixels
        if keep.sum() > max_instances:
            warnings.warn(f"{keep.sum()} instances in one image; keeping the {max_instances} largest "
                          "(raise detection.max_instances)", stacklevel=2)
            largest = np.argsort(-np.where(keep, areas, -1), kind="stable")[:max_instances]
            keep = np.zeros_like(keep)
            keep[largest] = True
        if not keep.all():
            lookup = np.zeros(int(ids.max()) + 1, labels.dtype)
            lookup[ids[keep]] = ids[keep]
            labels = lookup[labels]
    boxes, instance_ids = boxes_from_labels(labels)
    height, width = labels.shape
    n = len(boxes)
    out_boxes = np.zeros((max_instances, 4), np.float32)
    out_boxes[:n] = normalised_boxes(boxes, height, width)
    class_ids = np.zeros(max_instances, np.int32)
    class_ids[:n] = 1
    out_ids = np.zeros(max_instances, np.int32)
    out_ids[:n] = instance_ids
    return out_boxes, class_ids, out_ids, labels.astype(np.int32)


class MaskRCNNBatches(SeededEpochs, keras.utils.PyDataset):
    """``model.fit`` batches for a Mask R-CNN training model from a preprocessed instance dataset
    (``data.load(id)`` gives ``image`` and the label image ``target``)."""

    def __init__(self, data, ids: Sequence[str] | None, *, input_size: tuple[int, int], anchors: np.ndarray,
                 augment: A.Compose, batch_size: int = 4, shuffle: bool = True, seed: int = 0,
                 max_instances: int = 256, rpn_options: dict | None = None, steps_per_epoch: int | None = None,
                 workers: int = 1, use_multiprocessing: bool = False, max_queue_size: int = 10):
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size)
        self.data = data
        self._init_epochs(data.ids if ids is None else ids, augment=augment, batch_size=batch_size, shuffle=shuffle,
                          seed=seed, steps_per_epoch=steps_per_epoch)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.anchors = np.asarray(anchors, np.float32)
        self.max_instances = int(max_instances)
        self.rpn_options = dict(rpn_options or {})
        self._init_cache(data.load, file_bytes=lambda i: data.path(i).stat().st_size)

    def batch_at(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        samples = [self.sample(position, epoch) for position in self.positions(index)]
        return {key: np.stack([s[key] for s in samples]) for key in samples[0]}

    def sample(self, position: int, epoch: int | None = None) -> dict[str, np.ndarray]:
        """The ``position``-th sample of ``epoch`` (the current one by default), augmented and
        resized, with its targets."""
        epoch = self.epoch if epoch is None else epoch
        arrays = self._load(self.ids[self.order(epoch)[position]])
        state = np.random.SeedSequence([self.seed, epoch, position])
        augment = self._thread_augment()
        augment.set_random_seed(int(state.generate_state(1)[0]))
        out = augment(image=arrays["image"], mask=arrays["target"].astype(np.int32))
        image = out["image"] if out["image"].ndim == 3 else out["image"][..., None]
        boxes, class_ids, instance_ids, labels = instance_targets(out["mask"], self.max_instances)
        rpn_labels, rpn_deltas = rpn_targets(boxes, class_ids, self.anchors, rng=np.random.default_rng(state),
                                             **self.rpn_options)
        return {
            "image": image.astype(np.float32) * np.float32(1 / 255),
            "rpn_labels": rpn_labels.astype(np.int32),
            "rpn_deltas": rpn_deltas.astype(np.float32),
            "gt_boxes": boxes,
            "gt_class_ids": class_ids,
            "gt_instance_ids": instance_ids,
            "label_image": labels,
        }
