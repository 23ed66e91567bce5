"""Mask R-CNN (He et al., ICCV 2017) on a ResNet-FPN backbone as Keras 3 Functional models.

``maskrcnn(...)`` builds the inference model: image (B, H, W, C) in [0, 1] ->
``{"boxes" (B, D, 4), "scores" (B, D), "classes" (B, D) int32, "valid" (B,) int32,
"masks" (B, D, 28, 28)}`` -- normalised corner boxes (y_min, x_min, y_max, x_max), detections
first by decreasing score, and each detection's mask probabilities inside its box (paste them
into an image with :func:`kseg.tasks.maskrcnn.heads.paste_masks`).

Pieces (each its own module, all ``keras.ops``): the backbone + FPN P2-P6 (``fpn``), the RPN head,
anchors and proposal layer (``rpn``), RoIAlign over the pyramid and the detection target layer
(``roi_align``), box and mask heads and the detection layer (``maskrcnn_heads``), the five losses
(``kseg.tasks.maskrcnn.losses``). The trainable parts are nested models -- ``features``, ``rpn``, ``box_head``,
``mask_head`` -- so :func:`maskrcnn_training_model` builds the training graph around the very
same layers:
    image -> features -> rpn -> proposals (no gradient) -> detection targets (sampled RoIs, class,
    box and 28x28 mask targets from the label image) -> RoIAlign 7x7 -> box head,
    RoIAlign 14x14 -> mask head; loss = RPN class + RPN box + head class + head box + mask.

The training model takes the dict of :class:`kseg.tasks.maskrcnn.batches.MaskRCNNBatches` and owns
its loss (``add_loss``), so ``compile(optimizer=...)`` then ``fit(batches)`` trains it.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import layers, ops

from kseg.core.errors import ConfigError
from kseg.nn.blocks import input_normalization
from kseg.nn.fpn import FPN_DIVISOR, resnet_fpn_features
from kseg.nn.kernels import library_kernels
from kseg.nn.registry import register_model
from kseg.tasks.maskrcnn import losses as kseg_losses
from kseg.tasks.maskrcnn.heads import DetectionLayer, box_head, mask_head
from kseg.tasks.maskrcnn.roi_align import DetectionTargets, PyramidRoIAlign
from kseg.tasks.maskrcnn.rpn import ProposalLayer, fpn_anchors, rpn_head

__all__ = ["MaskRCNNLoss", "SelectClassMasks", "maskrcnn", "maskrcnn_anchors", "maskrcnn_training_model"]

CPU_ANCHOR_SCALES = (8, 16, 32, 64, 128)
"""Anchor sides in input pixels for P2..P6 on small (256 px) CPU inputs; the paper uses 32..512."""


def maskrcnn_anchors(input_size, anchor_scales=CPU_ANCHOR_SCALES, anchor_ratios=(0.5, 1.0, 2.0)) -> np.ndarray:
    """The (A, 4) anchors of a Mask R-CNN built with the same options, in the RPN's output order."""
    size = (int(input_size[0]), int(input_size[1]))
    return fpn_anchors(size, scales=tuple(anchor_scales), ratios=tuple(anchor_ratios))


@keras.saving.register_keras_serializable(package="kseg")
class StopGradient(layers.Layer):
    """Proposals and sampled RoIs are inputs to the heads, not functions to differentiate."""

    def call(self, x):
        return ops.stop_gradient(x)


@keras.saving.register_keras_serializable(package="kseg")
class DetectedRows(layers.Layer):
    """The detection boxes (B, D, 4) worth a mask: on TensorFlow's kernels (``kseg.nn.kernels``)
    only the first ``max(valid)`` rows, since detections come first and the rest is padding, so
    RoIAlign and the mask head skip the padding (D is sized for the most crowded image); on the
    ``keras.ops`` path all D rows (fixed shapes, as ``jax.jit`` needs)."""

    def call(self, boxes, valid):
        if not library_kernels():
            return boxes
        return boxes[:, : ops.maximum(ops.max(valid), 1)]


@keras.saving.register_keras_serializable(package="kseg")
class SelectClassMasks(layers.Layer):
    """Mask logits (B, n, h, w, C) and classes (B, D) -> probabilities (B, D, h, w) of each
    detection's own class.

    With ``valid`` (B,) (models built since the mask head skips padding): ``n <= D`` rows were
    computed, and every row at or beyond an image's valid count is 0. Without it (older saved
    models) ``n == D`` and padding rows keep whatever the head gave them.
    """

    def call(self, mask_logits, classes, valid=None):
        n_classes = mask_logits.shape[-1]
        classes = ops.cast(classes, "int32")
        n_rows = ops.shape(mask_logits)[1]
        one_hot = ops.one_hot(classes[:, :n_rows], n_classes)  # (B, n, C)
        logits = ops.sum(ops.cast(mask_logits, "float32") * one_hot[:, :, None, None, :], axis=-1)
        masks = ops.sigmoid(logits)
        if valid is None:
            return masks
        detected = ops.arange(n_rows)[None, :] < ops.cast(valid, "int32")[:, None]  # (B, n)
        masks = ops.where(detected[:, :, None, None], masks, 0.0)
        return ops.pad(masks, [[0, 0], [0, ops.shape(classes)[1] - n_rows], [0, 0], [0, 0]])

    def compute_output_shape(self, mask_logits_shape, classes_shape, valid_shape=None):
        return (mask_logits_shape[0], classes_shape[1], *mask_logits_shape[2:4])


def mask_branch(detections: dict, pyramid: Sequence, align: layers.Layer, mask_head: keras.Model):
    """Mask probabilities (B, D, 28, 28) of ``detections`` (the detection layer's dict) from the
    pyramid levels P2..P5 through the 14x14 RoIAlign ``align`` and ``mask_head``."""
    rows = DetectedRows(name="detected_rows")(detections["boxes"], detections["valid"])
    mask_logits = mask_head(align([rows, *pyramid[:4]]))
    return SelectClassMasks(name="masks")(mask_logits, detections["classes"], detections["valid"])


@keras.saving.register_keras_serializable(package="kseg")
class MaskRCNNLoss(layers.Layer):
    """Adds the five Mask R-CNN losses (weighted by ``weights``); returns the class logits (the
    training model's nominal output)."""

    NAMES = ("rpn_class", "rpn_box", "head_class", "head_box", "mask")

    def __init__(self, weights=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.NAMES))
        if unknown:
            raise ConfigError(f"unknown Mask R-CNN loss weight(s) {unknown}; known: {', '.join(self.NAMES)}")
        self.loss_weights = {name: float(weights.get(name, 1.0)) for name in self.NAMES}

    def call(self, class_logits, box_deltas, mask_logits, rpn_logits, rpn_deltas, rpn_labels, rpn_target_deltas,
             target_class_ids, target_deltas, target_masks, roi_valid):
        parts = {
            "rpn_class": kseg_losses.rpn_class_loss(rpn_labels, rpn_logits),
            "rpn_box": kseg_losses.rpn_box_loss(rpn_labels, rpn_target_deltas, rpn_deltas),
            "head_class": kseg_losses.head_class_loss(target_class_ids, class_logits, roi_valid),
            "head_box": kseg_losses.head_box_loss(target_class_ids, target_deltas, box_deltas),
            "mask": kseg_losses.mask_loss(target_class_ids, target_masks, mask_logits),
        }
        self.add_loss(sum(self.loss_weights[name] * value for name, value in parts.items()))
        return class_logits

    def compute_output_shape(self, class_logits_shape, *shapes):
        return class_logits_shape

    def get_config(self):
        return {**super().get_config(), "weights": dict(self.loss_weights)}


def _check_size(input_shape) -> tuple[int, int, int]:
    if len(input_shape) != 3 or any(s is None for s in input_shape):
        raise ConfigError(f"Mask R-CNN needs a fixed (height, width, channels) input, got {input_shape}")
    return int(input_shape[0]), int(input_shape[1]), int(input_shape[2])


def _pyramid_inputs(features: Sequence) -> list:
    return [keras.Input(shape=tuple(f.shape[1:]), name=f"p{level}") for level, f in zip(range(2, 7), features)]


@register_model("maskrcnn", task="instance", divisor=FPN_DIVISOR)
def maskrcnn(
    input_shape: Sequence[int] = (256, 256, 3),
    n_classes: int = 2,
    *,
    backbone: str = "small",
    width: int | None = None,
    weights: str | None = None,
    fpn_channels: int = 32,
    anchor_scales: Sequence[float] = CPU_ANCHOR_SCALES,
    anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_pre_nms: int = 1000,
    rpn_post_nms: int = 300,
    rpn_nms_iou: float = 0.7,
    canonical_size: float = 224.0,
    fc_channels: int = 256,
    mask_channels: int = 32,
    mask_convs: int = 4,
    max_detections: int = 200,
    min_confidence: float = 0.5,
    detection_nms_iou: float = 0.3,
    input_norm: str | None = "image",
    name: str = "maskrcnn",
) -> keras.Model:
    """Build the Mask R-CNN inference model (see the module notes).

    ``n_classes`` counts the background (2 = one object class). ``backbone`` ``"small"`` (CPU,
    ``width``) or ``"resnet50"`` / ``"resnet101"`` (``weights``: a local keras.applications file,
    never downloaded); ``fpn_channels`` 256 in the paper. ``anchor_scales`` are the anchor sides in
    input pixels on P2..P6. ``canonical_size`` is the FPN paper's 224: a RoI of that side (in input
    pixels) is pooled from P4, smaller ones from finer levels.
    """
    height, width_px, channels = _check_size(input_shape)
    if int(n_classes) < 2:
        raise ConfigError(f"n_classes counts the background class 0 and must be >= 2, got {n_classes}")
    image = keras.Input(shape=(height, width_px, channels), name="image")
    x = input_normalization(image, input_norm) if backbone == "small" else image
    pyramid = resnet_fpn_features(x, backbone, width=width, weights=weights, fpn_channels=fpn_channels)
    features = keras.Model(image, pyramid, name="features")

    levels = _pyramid_inputs(pyramid)
    rpn_logits, rpn_deltas = rpn_head(levels, anchors_per_location=len(anchor_ratios))
    rpn = keras.Model(levels, [rpn_logits, rpn_deltas], name="rpn")

    pooled = keras.Input(shape=(None, 7, 7, int(fpn_channels)), name="pooled")
    box = keras.Model(pooled, list(box_head(pooled, int(n_classes), fc_channels=fc_channels)), name="box_head")
    pooled_masks = keras.Input(shape=(None, 14, 14, int(fpn_channels)), name="pooled_masks")
    masks = keras.Model(pooled_masks, mask_head(pooled_masks, int(n_classes), channels=mask_channels,
                                                n_convs=mask_convs), name="mask_head")

    anchors = maskrcnn_anchors((height, width_px), anchor_scales, anchor_ratios)
    p = features(image)
    logits, deltas = rpn(p)
    proposals = ProposalLayer(anchors, pre_nms_top_k=rpn_pre_nms, post_nms_top_k=rpn_post_nms, nms_iou=rpn_nms_iou,
                              name="proposals")(logits, deltas)
    align7 = PyramidRoIAlign(output_size=(7, 7), image_size=(height, width_px), canonical=canonical_size,
                             name="roi_align")
    class_logits, box_deltas = box(align7([proposals, *p[:4]]))
    detections = DetectionLayer(max_detections=max_detections, min_confidence=min_confidence,
                                nms_iou=detection_nms_iou, name="detections")(proposals, class_logits, box_deltas)
    align14 = PyramidRoIAlign(output_size=(14, 14), image_size=(height, width_px), canonical=canonical_size,
                              name="roi_align_masks")
    outputs = dict(detections)
    outputs["masks"] = mask_branch(detections, p, align14, masks)
    return keras.Model(image, outputs, name=name)


def maskrcnn_training_model(inference: keras.Model, *, rois_per_image: int = 200, positive_fraction: float = 0.25,
                            max_instances: int = 256, loss_weights=None, seed: int | None = None) -> keras.Model:
    """The training graph around ``inference``'s nested ``features``, ``rpn``, ``box_head`` and
    ``mask_head`` models (weights shared). Inputs: the batch dict of ``MaskRCNNBatches``."""
    try:
        features, rpn = inference.get_layer("features"), inference.get_layer("rpn")
        box, masks = inference.get_layer("box_head"), inference.get_layer("mask_head")
        proposal_layer = inference.get_layer("proposals")
        align_layer = inference.get_layer("roi_align")
    except ValueError as exc:
        raise ConfigError(f"{inference.name!r} is not a kseg Mask R-CNN inference model ({exc})") from None
    height, width, channels = (int(s) for s in inference.inputs[0].shape[1:])
    n_anchors = len(proposal_layer.anchors)
    image = keras.Input(shape=(height, width, channels), name="image")
    rpn_labels = keras.Input(shape=(n_anchors,), dtype="int32", name="rpn_labels")
    rpn_target_deltas = keras.Input(shape=(n_anchors, 4), name="rpn_deltas")
    gt_boxes = keras.Input(shape=(max_instances, 4), name="gt_boxes")
    gt_class_ids = keras.Input(shape=(max_instances,), dtype="int32", name="gt_class_ids")
    gt_instance_ids = keras.Input(shape=(max_instances,), dtype="int32", name="gt_instance_ids")
    label_image = keras.Input(shape=(height, width), dtype="int32", name="label_image")

    p = features(image)
    logits, deltas = rpn(p)
    proposals = StopGradient(name="proposals_no_gradient")(
        ProposalLayer.from_config(proposal_layer.get_config())(logits, deltas))
    targets = DetectionTargets(rois_per_image=rois_per_image, positive_fraction=positive_fraction, seed=seed,
                               name="detection_targets")([proposals, gt_boxes, gt_class_ids, gt_instance_ids,
                                                          label_image])
    rois = targets["rois"]  # gradient-stopped by the layer
    align7 = PyramidRoIAlign.from_config(align_layer.get_config())
    class_logits, box_deltas = box(align7([rois, *p[:4]]))
    align14 = PyramidRoIAlign.from_config({**align_layer.get_config(), "name": "roi_align_masks",
                                            "output_size": (14, 14)})
    mask_logits = masks(align14([rois, *p[:4]]))
    out = MaskRCNNLoss(loss_weights, name="maskrcnn_loss")(
        class_logits, box_deltas, mask_logits, logits, deltas, rpn_labels, rpn_target_deltas,
        targets["target_class_ids"], targets["target_deltas"], targets["target_masks"], targets["roi_valid"])
    inputs = {"image": image, "rpn_labels": rpn_labels, "rpn_deltas": rpn_target_deltas, "gt_boxes": gt_boxes,
              "gt_class_ids": gt_class_ids, "gt_instance_ids": gt_instance_ids, "label_image": label_image}
    return keras.Model(inputs, out, name=f"{inference.name}_training")
