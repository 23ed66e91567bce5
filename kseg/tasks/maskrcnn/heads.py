"""Mask R-CNN (He et al., ICCV 2017) second-stage heads, detection layer and mask pasting.

The heads take the features already pooled per RoI (``PyramidRoIAlign``), so they do not depend
on the backbone, the FPN or the RPN:

* ``box_head(pooled (B, R, 7, 7, C), n_classes)`` -> ``class_logits`` (B, R, n_classes) and
  ``box_deltas`` (B, R, n_classes, 4): the FPN paper's "2fc" head. The first fc layer is a Dense
  on the flattened 7x7xC features (the same map as a 7x7 'valid' convolution), the second a
  Dense (a 1x1 convolution), both ReLU; then a linear class layer and a class-specific box
  layer. Dense layers act on the last axis, so no per-RoI loop and the batch may be dynamic.
* ``mask_head(pooled (B, R, 14, 14, C), n_classes)`` -> ``mask_logits`` (B, R, 28, 28,
  n_classes): 4 x (3x3 conv + ReLU), a 2x2 stride-2 transposed conv + ReLU, a 1x1 conv to
  one logit map per class (the consumer applies the sigmoid and picks the class channel). The
  convolutions run on a (B * R, 14, 14, C) view (``MergeRoIs`` / ``SplitRoIs``), not through
  ``TimeDistributed``, which loops over a static RoI axis.

Both outputs are float32 even under mixed precision. Class 0 is background; box deltas follow
``box_ops.encode_boxes`` against the RoIs with ``BOX_VARIANCES`` (Faster R-CNN's BBOX_STD_DEV).

``DetectionLayer`` turns RoIs and head outputs into fixed-shape detections (softmax, best
object class per RoI, refine, clip, per-class NMS), in ``keras.ops`` only so it runs on the
TensorFlow and JAX backends, eagerly, in a ``tf.function`` graph or under ``jax.jit``.

``paste_masks`` (NumPy + OpenCV, at prediction time, outside the graph) turns the detections'
28x28 mask probabilities into one instance label image without overlaps.

Boxes are float32 corner boxes ``(y_min, x_min, y_max, x_max)`` normalised to [0, 1] by the image
height and width; padding RoIs are all-zero rows.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import keras
import numpy as np
from keras import layers, ops

from kseg.core.errors import ConfigError
from kseg.nn import box_ops

__all__ = [
    "BOX_VARIANCES",
    "DetectionLayer",
    "MergeRoIs",
    "SplitRoIs",
    "box_head",
    "mask_head",
    "paste_masks",
]

BOX_VARIANCES = box_ops.VARIANCES
"""Scales of the (cy, cx, h, w) box deltas: (0.1, 0.1, 0.2, 0.2), Faster R-CNN's BBOX_STD_DEV."""


# ----------------------------------------------------------------------------- RoI axis reshapes


@keras.saving.register_keras_serializable(package="kseg")
class MergeRoIs(layers.Layer):
    """(B, R, ...) -> (B * R, ...), so 2-D layers process every RoI of every image at once."""

    def call(self, x):
        return ops.reshape(x, (-1, *x.shape[2:]))

    def compute_output_shape(self, input_shape):
        batch, rois = input_shape[0], input_shape[1]
        merged = None if batch is None or rois is None else batch * rois
        return (merged, *input_shape[2:])


@keras.saving.register_keras_serializable(package="kseg")
class SplitRoIs(layers.Layer):
    """(B * R, ...) -> (B, R, ...), with R read from ``reference`` (B, R, ...); undoes ``MergeRoIs``."""

    def call(self, x, reference):
        rois = reference.shape[1]
        if rois is None:
            rois = ops.shape(reference)[1]
        return ops.reshape(x, (-1, rois, *x.shape[1:]))

    def compute_output_shape(self, x_shape, reference_shape):
        return (reference_shape[0], reference_shape[1], *x_shape[1:])


# ----------------------------------------------------------------------------- heads


def _check_pooled(pooled, what: str) -> None:
    shape = tuple(pooled.shape)
    if len(shape) != 5 or any(size is None for size in shape[2:]):
        raise ConfigError(f"{what} takes pooled RoI features (B, R, height, width, channels) with "
                          f"static height, width and channels, got shape {shape}")


def _check_classes(n_classes) -> int:
    if int(n_classes) < 2:
        raise ConfigError(f"n_classes counts the background class 0 and must be >= 2, got {n_classes}")
    return int(n_classes)


def box_head(pooled, n_classes: int, fc_channels: int = 1024, name: str = "box_head"):
    """Class logits (B, R, n_classes) and class-specific box deltas (B, R, n_classes, 4), float32.

    ``pooled`` is (B, R, P, P, C) (P = 7 in Mask R-CNN); B and R may be dynamic. Layers are named
    ``{name}_fc1``, ``{name}_fc2``, ``{name}_class_logits`` and ``{name}_box_deltas``.
    """
    _check_pooled(pooled, "box_head")
    n_classes = _check_classes(n_classes)
    if int(fc_channels) < 1:
        raise ConfigError(f"fc_channels must be positive, got {fc_channels}")
    height, width, channels = pooled.shape[2:]
    x = layers.Reshape((-1, height * width * channels), name=f"{name}_flatten")(pooled)
    x = layers.Dense(int(fc_channels), activation="relu", name=f"{name}_fc1")(x)
    x = layers.Dense(int(fc_channels), activation="relu", name=f"{name}_fc2")(x)
    logits = layers.Dense(n_classes, name=f"{name}_class_logits")(x)
    deltas = layers.Dense(n_classes * 4, name=f"{name}_box_deltas")(x)
    deltas = layers.Reshape((-1, n_classes, 4), name=f"{name}_box_deltas_reshape")(deltas)
    logits = layers.Activation("linear", dtype="float32", name=f"{name}_class_logits_float32")(logits)
    deltas = layers.Activation("linear", dtype="float32", name=f"{name}_box_deltas_float32")(deltas)
    return logits, deltas


def mask_head(pooled, n_classes: int, channels: int = 256, n_convs: int = 4, name: str = "mask_head"):
    """Per-class mask logits (B, R, 2P, 2P, n_classes), float32, from ``pooled`` (B, R, P, P, C).

    P = 14 in Mask R-CNN, giving 28x28 masks. Layers: ``{name}_conv{i}`` (3x3, ReLU),
    ``{name}_deconv`` (2x2 stride 2, ReLU), ``{name}_logits`` (1x1). B and R may be dynamic.
    """
    _check_pooled(pooled, "mask_head")
    n_classes = _check_classes(n_classes)
    if int(channels) < 1 or int(n_convs) < 0:
        raise ConfigError(f"need channels >= 1 and n_convs >= 0, got {channels} and {n_convs}")
    x = MergeRoIs(name=f"{name}_merge_rois")(pooled)
    for i in range(int(n_convs)):
        x = layers.Conv2D(int(channels), 3, padding="same", activation="relu",
                          name=f"{name}_conv{i + 1}")(x)
    x = layers.Conv2DTranspose(int(channels), 2, strides=2, activation="relu", name=f"{name}_deconv")(x)
    x = layers.Conv2D(n_classes, 1, name=f"{name}_logits")(x)
    x = SplitRoIs(name=f"{name}_split_rois")(x, pooled)
    return layers.Activation("linear", dtype="float32", name=f"{name}_logits_float32")(x)


# ----------------------------------------------------------------------------- detections


@keras.saving.register_keras_serializable(package="kseg")
class DetectionLayer(layers.Layer):
    """RoIs and box-head outputs -> fixed-shape detections, as Mask R-CNN's inference stage.

    ``call(rois (B, R, 4), class_logits (B, R, C), box_deltas (B, R, C, 4))``, R and C static:

    1. softmax over the C classes; each RoI takes its best object class (1..C-1) and that
       class's probability as score. With ``drop_background_rois`` (default, as matterport's
       argmax over all classes) a RoI whose background probability is at least that score is
       dropped; it only matters when ``min_confidence`` < 0.5;
    2. the RoI is refined with that class's deltas (``box_ops.decode_boxes``, ``variances``)
       and clipped to [0, 1];
    3. padding RoIs (all-zero rows) and scores below ``min_confidence`` are dropped;
    4. per-class greedy NMS (IoU strictly above ``nms_iou`` suppresses) through
       ``box_ops.batched_class_nms``, then the best ``max_detections`` over all classes.

    Returns ``{"boxes" (B, D, 4), "scores" (B, D), "classes" (B, D) int32, "valid" (B,) int32}``
    with D = ``max_detections``: detections first in decreasing score order, padding rows zero.
    Each class runs its own NMS over ``min(R, pre_nms_top_k)`` candidates (a k x k IoU matrix
    and a k-step loop), so the cost grows with the number of classes.
    """

    def __init__(self, max_detections: int = 100, min_confidence: float = 0.5, nms_iou: float = 0.3,
                 pre_nms_top_k: int = 1000, variances: Sequence[float] = BOX_VARIANCES,
                 drop_background_rois: bool = True, **kwargs):
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        if int(max_detections) < 1 or int(pre_nms_top_k) < 1:
            raise ConfigError(f"max_detections and pre_nms_top_k must be positive, got "
                              f"{max_detections} and {pre_nms_top_k}")
        if not 0.0 <= float(min_confidence) <= 1.0:
            raise ConfigError(f"min_confidence must be in [0, 1], got {min_confidence}")
        if not 0.0 <= float(nms_iou) <= 1.0:
            raise ConfigError(f"nms_iou must be in [0, 1], got {nms_iou}")
        if len(variances) != 4 or min(float(v) for v in variances) <= 0:
            raise ConfigError(f"variances must be 4 positive numbers, got {variances}")
        self.max_detections = int(max_detections)
        self.min_confidence = float(min_confidence)
        self.nms_iou = float(nms_iou)
        self.pre_nms_top_k = int(pre_nms_top_k)
        self.variances = tuple(float(v) for v in variances)
        self.drop_background_rois = bool(drop_background_rois)

    def call(self, rois, class_logits, box_deltas):
        rois = ops.cast(rois, "float32")
        class_logits = ops.cast(class_logits, "float32")
        box_deltas = ops.cast(box_deltas, "float32")
        n_classes = class_logits.shape[-1]
        if n_classes is None or n_classes < 2:
            raise ValueError(f"class_logits need a static class axis of at least 2, got {class_logits.shape}")
        if tuple(box_deltas.shape[-2:]) != (n_classes, 4):
            raise ValueError(f"box_deltas must be (B, R, {n_classes}, 4), got {box_deltas.shape}")

        probs = ops.softmax(class_logits, axis=-1)
        object_class = ops.argmax(probs[..., 1:], axis=-1) + 1  # (B, R), in 1..C-1
        score = ops.take_along_axis(probs, object_class[..., None], axis=-1)[..., 0]
        deltas = ops.take_along_axis(box_deltas, object_class[..., None, None], axis=-2)[..., 0, :]
        boxes = box_ops.clip_boxes(box_ops.decode_boxes(deltas, rois, self.variances))

        keep = ops.logical_and(ops.any(ops.not_equal(rois, 0.0), axis=-1), score >= self.min_confidence)
        if self.drop_background_rois:
            keep = ops.logical_and(keep, probs[..., 0] < score)
        # One score column per class, the RoI's score at its class and -1 elsewhere: -1 is below
        # any threshold in [0, 1], so dropped RoIs and other classes are never NMS candidates.
        at_class = ops.equal(object_class[..., None], ops.arange(n_classes)[None, None, :])
        class_scores = ops.where(ops.logical_and(at_class, keep[..., None]), score[..., None], -1.0)
        return box_ops.batched_class_nms(
            boxes, class_scores, max_output=self.max_detections, iou_threshold=self.nms_iou,
            score_threshold=self.min_confidence, pre_nms_top_k=self.pre_nms_top_k,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "max_detections": self.max_detections,
            "min_confidence": self.min_confidence,
            "nms_iou": self.nms_iou,
            "pre_nms_top_k": self.pre_nms_top_k,
            "variances": list(self.variances),
            "drop_background_rois": self.drop_background_rois,
        }


# ----------------------------------------------------------------------------- mask pasting


def _pixel_span(low: float, high: float) -> tuple[int, int]:
    """Pixels [start, stop) whose centres lie in [low, high) (pixel units), at least one pixel."""
    start = int(np.ceil(low - 0.5))
    stop = max(int(np.ceil(high - 0.5)), start + 1)
    return start, stop


def paste_masks(boxes, masks, scores, image_size: tuple[int, int], threshold: float = 0.5,
                min_size: int = 1, return_indices: bool = False):
    """Instance label image (H, W) int32 from K detections' box-relative mask probabilities.

    ``boxes`` (K, 4) normalised corner boxes, ``masks`` (K, h, w) probabilities (e.g. the
    sigmoid of the mask head's 28x28 logits at each detection's class), ``scores`` (K,).

    Each mask is resized (``cv2.resize``, bilinear) onto the pixels of its box and thresholded
    (``>= threshold``). The box covers the pixels whose centres lie in it: rows
    ``ceil(y_min * H - 0.5)`` to ``ceil(y_max * H - 0.5)`` (exclusive), i.e. each edge rounded to
    the nearest pixel boundary, and at least one pixel; columns alike with W. Parts outside the
    image are cut off after resizing. Only the box region is touched, so memory is one (H, W)
    label image plus one box-sized mask at a time.

    Overlaps: masks are pasted in increasing score order, so the higher score owns a shared
    pixel (equal scores: the earlier detection). An instance left with fewer than ``min_size``
    pixels (its own thresholded mask before pasting, or what remains after higher scores took
    their pixels) is dropped; the pixels it kept become background. The remaining instances are
    numbered 1..K' in input order. With ``return_indices`` the result is ``(labels, kept)``
    where ``kept`` (K',) int64 gives the input row of each label id (id ``j`` is row ``kept[j-1]``).
    """
    height, width = (int(size) for size in image_size)
    if height < 1 or width < 1:
        raise ConfigError(f"image_size must be (height, width) with positive sizes, got {image_size}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    masks = np.asarray(masks, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = len(boxes)
    if masks.ndim != 3 or len(masks) != n or len(scores) != n:
        raise ValueError(f"need boxes (K, 4), masks (K, h, w) and scores (K,), got shapes {boxes.shape}, "
                         f"{masks.shape} and {scores.shape}")
    min_size = max(int(min_size), 1)

    labels = np.zeros((height, width), dtype=np.int32)
    # Increasing score; among equal scores the later row first, so the earlier row pastes last.
    order = np.lexsort((-np.arange(n), scores))
    for index in order:
        y_min, x_min, y_max, x_max = boxes[index] * (height, width, height, width)
        top, bottom = _pixel_span(y_min, y_max)
        left, right = _pixel_span(x_min, x_max)
        if bottom <= 0 or right <= 0 or top >= height or left >= width:
            continue
        resized = cv2.resize(masks[index], (right - left, bottom - top), interpolation=cv2.INTER_LINEAR)
        resized = resized.reshape(bottom - top, right - left)  # cv2 drops a unit axis
        inside = resized[max(-top, 0):height - top, max(-left, 0):width - left] >= threshold
        if np.count_nonzero(inside) < min_size:
            continue
        region = labels[max(top, 0):bottom, max(left, 0):right]
        region[inside] = index + 1

    counts = np.bincount(labels.ravel(), minlength=n + 1)
    kept = np.flatnonzero(counts[1:] >= min_size)
    renumber = np.zeros(n + 1, dtype=np.int32)
    renumber[kept + 1] = np.arange(1, len(kept) + 1, dtype=np.int32)
    labels = renumber[labels]
    return (labels, kept) if return_indices else labels
