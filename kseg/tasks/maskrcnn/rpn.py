"""Region Proposal Network for Mask R-CNN (He et al. 2017): FPN anchors, the shared RPN head,
the per-image training targets and the proposal layer.

The RPN (Ren et al., Faster R-CNN) scores every anchor as object / not object and regresses it
towards the object; with FPN (Lin et al.) each pyramid level P2..P6 gets anchors of ONE scale and
the same small head runs on every level, so the anchors, the head outputs and the targets must
agree row for row. This module is where that order is defined.

Conventions (as ``kseg.nn.box_ops``):
    * Boxes are float32 corner boxes ``(y_min, x_min, y_max, x_max)`` normalised to [0, 1] by the
      image height (y) and width (x). Anchor sizes and strides are given in input pixels.
    * Anchor order: level by level (as listed), then positions row-major (row i, then column j),
      then the ratios in the order given. The head's reshaped (B, rows * cols * k, .) outputs,
      concatenated level by level, follow the same order.
    * ``ratio`` is height / width: an anchor of scale s and ratio r is ``s * sqrt(r)`` pixels high
      and ``s / sqrt(r)`` wide (area s^2). Note this is the inverse of ``box_ops.default_boxes``
      (SSD's aspect ratio is width / height); with the symmetric default (0.5, 1, 2) only the order
      of the three anchors per position differs.
    * Anchors are NOT clipped to the image, and ``rpn_targets`` keeps anchors that cross the
      border (as the Matterport implementation, unlike the Faster R-CNN paper which ignores them
      in training): on small inputs most P5/P6 anchors cross the border, and dropping them would
      leave large objects without anchors. Proposals are clipped after decoding.
    * Deltas: ``box_ops.encode_boxes`` / ``decode_boxes`` against the anchors with variances
      ``box_ops.VARIANCES`` = (0.1, 0.1, 0.2, 0.2) (Faster R-CNN's BBOX_STD_DEV).
    * RPN labels: 1 positive, 0 negative, -1 ignored (``kseg.tasks.maskrcnn.losses.rpn_class_loss`` /
      ``rpn_box_loss`` read them).

``fpn_anchors`` and ``rpn_targets`` are NumPy (computed once / in the data generator, one image
at a time); ``rpn_head`` and ``ProposalLayer`` use Keras layers and ``keras.ops`` only, with fixed
shapes, so they run on TensorFlow and JAX, eagerly, in a compiled graph or under ``jax.jit``.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import numpy as np
from keras import layers, ops

from kseg.core.errors import ConfigError
from kseg.nn import box_ops
from kseg.nn.kernels import numpy_fast_paths

__all__ = [
    "FPN_SCALES",
    "FPN_STRIDES",
    "RPN_RATIOS",
    "ProposalLayer",
    "fpn_anchors",
    "rpn_head",
    "rpn_targets",
]

FPN_STRIDES = (4, 8, 16, 32, 64)
"""Strides of P2..P6 in input pixels."""

FPN_SCALES = (32, 64, 128, 256, 512)
"""Anchor side (pixels) per level for ~1024 px inputs; scale them down with the input size."""

RPN_RATIOS = (0.5, 1.0, 2.0)
"""Anchor height / width ratios at every position."""

_IOU_CHUNK = 1 << 22
"""About how many anchor-truth IoUs ``rpn_targets`` computes at once (bounds its memory: ~50 MB)."""

_TIE_TOLERANCE = 1e-6
"""Relative IoU slack under which anchors tie for a truth's best IoU (float32 anchor rounding)."""


# ----------------------------------------------------------------------------- anchors


def _image_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        image_size = (image_size, image_size)
    size = tuple(image_size)[:2]
    if len(size) != 2 or any(s is None or int(s) < 1 for s in size):
        raise ConfigError(f"image_size must be (height, width) with positive sizes, got {image_size}")
    return int(size[0]), int(size[1])


def _level_shapes(image_size, strides: Sequence[int] = FPN_STRIDES) -> list[tuple[int, int]]:
    """(rows, cols) of each pyramid level: ``ceil(size / stride)`` ('same'-padded stride-2 steps)."""
    height, width = _image_size(image_size)
    if len(strides) == 0 or min(int(s) for s in strides) < 1:
        raise ConfigError(f"strides must be positive integers, got {tuple(strides)}")
    return [(math.ceil(height / int(s)), math.ceil(width / int(s))) for s in strides]


def fpn_anchors(
    image_size,
    strides: Sequence[int] = FPN_STRIDES,
    scales: Sequence[float] = FPN_SCALES,
    ratios: Sequence[float] = RPN_RATIOS,
    anchor_stride: int = 1,
) -> np.ndarray:
    """All FPN anchors, float32 (A, 4) normalised corner boxes, not clipped.

    Level l (stride ``strides[l]``, one anchor size ``scales[l]`` in pixels) has a
    ``_level_shapes`` grid; every ``anchor_stride``-th row and column is a position, centred
    at ``((i + 0.5) * stride, (j + 0.5) * stride)`` pixels for grid cell (i, j). Each position has
    ``len(ratios)`` anchors, ``scale * sqrt(r)`` high and ``scale / sqrt(r)`` wide (r = height /
    width). Order: level, then positions row-major, then ratios (see the module notes), so
    A = sum(ceil(rows / anchor_stride) * ceil(cols / anchor_stride)) * len(ratios).
    """
    height, width = _image_size(image_size)
    if len(strides) != len(scales):
        raise ConfigError(f"need one anchor scale per FPN level: {len(strides)} strides "
                          f"{tuple(strides)} but {len(scales)} scales {tuple(scales)}")
    ratios = np.asarray(ratios, dtype=np.float64).ravel()
    if ratios.size == 0 or ratios.min() <= 0:
        raise ConfigError(f"anchor ratios must be positive (height / width), got {ratios.tolist()}")
    scales = np.asarray(scales, dtype=np.float64).ravel()
    if scales.min() <= 0:
        raise ConfigError(f"anchor scales must be positive pixel sizes, got {scales.tolist()}")
    if int(anchor_stride) < 1:
        raise ConfigError(f"anchor_stride must be >= 1, got {anchor_stride}")
    anchor_stride = int(anchor_stride)

    all_anchors = []
    for (rows, cols), stride, scale in zip(_level_shapes((height, width), strides), strides, scales):
        center_y = (np.arange(0, rows, anchor_stride) + 0.5) * stride  # pixels
        center_x = (np.arange(0, cols, anchor_stride) + 0.5) * stride
        half_h = scale * np.sqrt(ratios) / 2
        half_w = scale / np.sqrt(ratios) / 2
        # (rows, cols, k) grids of every coordinate, broadcast instead of looping.
        cy, cx = center_y[:, None, None], center_x[None, :, None]
        corners = np.stack(np.broadcast_arrays(cy - half_h, cx - half_w, cy + half_h, cx + half_w), axis=-1)
        all_anchors.append(corners.reshape(-1, 4))
    anchors = np.concatenate(all_anchors, axis=0) / np.array([height, width, height, width], np.float64)
    return anchors.astype(np.float32)


# ----------------------------------------------------------------------------- head


def rpn_head(features, anchors_per_location: int = 3, channels: int | None = None, *,
             anchor_stride: int = 1, name: str = "rpn"):
    """The RPN head on every pyramid level, with ONE set of weights shared by all levels.

    ``features`` is a list of (B, h, w, C) maps (P2..P6, the same C). A 3x3 conv (``channels``
    filters, default C, ReLU, stride ``anchor_stride``) is followed by a 1x1 conv giving one
    objectness logit per anchor and a 1x1 conv giving 4 deltas per anchor; the same three layer
    objects (``{name}_conv``, ``{name}_class``, ``{name}_bbox``) are applied to each level. Each
    level's output is reshaped to (B, h * w * k, .) and the levels are concatenated in order,
    which is the ``fpn_anchors`` order. Returns ``(logits (B, A, 1), deltas (B, A, 4))``, float32
    (also under a mixed precision policy). Weights start as N(0, 0.01), biases 0 (as Detectron).
    """
    features = list(features)
    if not features:
        raise ConfigError("rpn_head needs at least one feature map")
    k = int(anchors_per_location)
    if k < 1:
        raise ConfigError(f"anchors_per_location must be >= 1, got {anchors_per_location}")
    in_channels = {f.shape[-1] for f in features}
    if len(in_channels) != 1:
        raise ConfigError(f"all pyramid levels must have the same channel count to share the RPN "
                          f"head, got {sorted(in_channels, key=str)}")
    channels = int(channels or next(iter(in_channels)))

    def init():
        return keras.initializers.RandomNormal(stddev=0.01)

    shared = layers.Conv2D(channels, 3, strides=int(anchor_stride), padding="same", activation="relu",
                           kernel_initializer=init(), name=f"{name}_conv")
    objectness = layers.Conv2D(k, 1, kernel_initializer=init(), name=f"{name}_class")
    box_deltas = layers.Conv2D(4 * k, 1, kernel_initializer=init(), name=f"{name}_bbox")

    logits, deltas = [], []
    for level, feature in enumerate(features):
        x = shared(feature)
        logits.append(layers.Reshape((-1, 1), dtype="float32", name=f"{name}_logits_{level}")(objectness(x)))
        deltas.append(layers.Reshape((-1, 4), dtype="float32", name=f"{name}_deltas_{level}")(box_deltas(x)))
    if len(features) == 1:
        return logits[0], deltas[0]
    return (layers.Concatenate(axis=1, dtype="float32", name=f"{name}_logits")(logits),
            layers.Concatenate(axis=1, dtype="float32", name=f"{name}_deltas")(deltas))


# ----------------------------------------------------------------------------- targets


def _iou_float32(anchors: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU matrix (N, M) of float32 corner boxes, in place where possible.

    The formula of ``kseg.core.boxes.iou_matrix``, but in float32 with few
    temporaries: it is the bulk of ``rpn_targets``' time (about 3x faster than the float64 one).
    """
    inter_h = np.minimum(anchors[:, None, 2], truth[None, :, 2])
    inter_h -= np.maximum(anchors[:, None, 0], truth[None, :, 0])
    np.maximum(inter_h, 0, out=inter_h)
    inter_w = np.minimum(anchors[:, None, 3], truth[None, :, 3])
    inter_w -= np.maximum(anchors[:, None, 1], truth[None, :, 1])
    np.maximum(inter_w, 0, out=inter_w)
    inter_h *= inter_w  # the intersection
    area_a = np.maximum(anchors[:, 2] - anchors[:, 0], 0) * np.maximum(anchors[:, 3] - anchors[:, 1], 0)
    area_t = np.maximum(truth[:, 2] - truth[:, 0], 0) * np.maximum(truth[:, 3] - truth[:, 1], 0)
    union = area_a[:, None] + area_t[None, :]
    union -= inter_h
    return np.divide(inter_h, union, out=np.zeros_like(inter_h), where=union > 0)


def _match_anchors(anchors: np.ndarray, truth: np.ndarray):
    """(best IoU per anchor, its truth index, is-a-truth's-best-anchor) for (A, 4) and (T, 4), T >= 1.

    One IoU matrix when it has at most ``_IOU_CHUNK`` entries (every image of up to a few hundred
    objects at 512 px); otherwise chunks of anchors, with a second pass over the few chunks that
    hold a truth's maximum to find every anchor tied at it.
    """
    n_anchors = len(anchors)
    chunk = max(1, _IOU_CHUNK // len(truth))
    if n_anchors <= chunk:
        iou = _iou_float32(anchors, truth)  # (A, T)
        best_truth = iou.argmax(axis=1)
        best_iou = np.take_along_axis(iou, best_truth[:, None], axis=1)[:, 0]
        return best_iou, best_truth, (iou >= _tie_threshold(iou.max(axis=0))).any(axis=1)
    starts = range(0, n_anchors, chunk)
    best_iou = np.empty(n_anchors, np.float32)
    best_truth = np.empty(n_anchors, np.intp)
    chunk_best = np.empty((len(starts), len(truth)), np.float32)  # per chunk, each truth's best IoU
    for c, start in enumerate(starts):
        iou = _iou_float32(anchors[start:start + chunk], truth)  # (chunk, T)
        best_truth[start:start + chunk] = iou.argmax(axis=1)
        best_iou[start:start + chunk] = iou.max(axis=1)
        chunk_best[c] = iou.max(axis=0)
    threshold = _tie_threshold(chunk_best.max(axis=0))
    forced = np.zeros(n_anchors, bool)
    for c in np.flatnonzero((chunk_best >= threshold).any(axis=1)):
        start = starts[c]
        iou = _iou_float32(anchors[start:start + chunk], truth)
        forced[start:start + chunk] = (iou >= threshold).any(axis=1)
    return best_iou, best_truth, forced


def _tie_threshold(truth_best: np.ndarray) -> np.ndarray:
    """IoU at or above which an anchor ties for each truth's best; a truth that overlaps no anchor
    at all (e.g. zero area) forces nothing."""
    return np.where(truth_best > 0, truth_best * (1 - _TIE_TOLERANCE), np.inf).astype(np.float32)


def rpn_targets(
    gt_boxes,
    gt_valid,
    anchors,
    positive_iou: float = 0.7,
    negative_iou: float = 0.3,
    anchors_per_image: int = 256,
    positive_fraction: float = 0.5,
    rng: np.random.Generator | None = None,
    variances: Sequence[float] = box_ops.VARIANCES,
) -> tuple[np.ndarray, np.ndarray]:
    """RPN training targets of ONE image: (labels (A,) int8, deltas (A, 4) float32), NumPy.

    ``gt_boxes`` (T, 4) normalised corner boxes; ``gt_valid`` (T,) bools, or class ids where 0
    (or below) marks a padding row; padding rows are ignored. ``anchors`` (A, 4) from
    ``fpn_anchors``. Labelling (Faster R-CNN, as Matterport):

    * negative (0): the anchor's best IoU with any truth is below ``negative_iou``;
    * positive (1): best IoU >= ``positive_iou``, or the anchor is a truth's best anchor -- every
      anchor tied at that truth's maximum IoU (within a 1e-6 relative slack), provided it is > 0;
      this overrides a negative label;
    * everything else is ignored (-1).

    Then at most ``int(anchors_per_image * positive_fraction)`` positives are kept at random,
    and at most ``anchors_per_image - n_positive`` negatives; the rest become -1. Deltas of the
    positives encode the anchor's best-IoU truth (``box_ops.encode_boxes`` with ``variances``),
    every other row is zero. With no valid truth, ``anchors_per_image`` random anchors are
    negative. ``rng`` (a ``np.random.Generator``) makes the sampling reproducible.
    """
    if not 0.0 <= float(negative_iou) <= float(positive_iou) <= 1.0:
        raise ConfigError(f"need 0 <= negative_iou <= positive_iou <= 1, got {negative_iou}, {positive_iou}")
    if int(anchors_per_image) < 1:
        raise ConfigError(f"anchors_per_image must be >= 1, got {anchors_per_image}")
    if not 0.0 < float(positive_fraction) <= 1.0:
        raise ConfigError(f"positive_fraction must be in (0, 1], got {positive_fraction}")
    anchors = np.asarray(anchors, dtype=np.float32)
    if anchors.ndim != 2 or anchors.shape[1] != 4:
        raise ConfigError(f"anchors must be (A, 4), got shape {anchors.shape}")
    gt_boxes = np.asarray(gt_boxes, dtype=np.float32).reshape(-1, 4)
    gt_valid = np.asarray(gt_valid).reshape(-1)
    if len(gt_valid) != len(gt_boxes):
        raise ConfigError(f"gt_boxes has {len(gt_boxes)} rows but gt_valid {len(gt_valid)}")
    valid = gt_valid if gt_valid.dtype == bool else gt_valid > 0
    truth = gt_boxes[valid]
    rng = np.random.default_rng() if rng is None else rng

    n_anchors = len(anchors)
    labels = np.full(n_anchors, -1, np.int8)
    deltas = np.zeros((n_anchors, 4), np.float32)
    if len(truth):
        best_iou, best_truth, forced = _match_anchors(anchors, truth)
        labels[best_iou < negative_iou] = 0
        labels[forced | (best_iou >= positive_iou)] = 1
    else:
        labels[:] = 0

    positives = np.flatnonzero(labels == 1)
    max_positives = int(int(anchors_per_image) * float(positive_fraction))
    if len(positives) > max_positives:
        labels[rng.choice(positives, len(positives) - max_positives, replace=False)] = -1
        positives = np.flatnonzero(labels == 1)
    negatives = np.flatnonzero(labels == 0)
    max_negatives = int(anchors_per_image) - len(positives)
    if len(negatives) > max_negatives:
        labels[rng.choice(negatives, len(negatives) - max_negatives, replace=False)] = -1

    if len(positives):
        xp = np if numpy_fast_paths() else ops  # NumPy: no eager backend calls per image
        deltas[positives] = np.asarray(box_ops.encode_boxes(truth[best_truth[positives]], anchors[positives],
                                                            variances, xp=xp))
    return labels, deltas


# ----------------------------------------------------------------------------- proposals


@keras.saving.register_keras_serializable(package="kseg")
class ProposalLayer(layers.Layer):
    """RPN outputs -> (B, post_nms_top_k, 4) normalised proposals, best first, zero-padded.

    ``call(logits (B, A, 1), deltas (B, A, 4))`` against the stored ``anchors`` (A, 4): sigmoid
    scores; the ``pre_nms_top_k`` best anchors; their deltas decoded (``box_ops.decode_boxes``
    with ``variances``) and clipped to [0, 1]; boxes whose height or width is not above
    ``min_size`` (normalised; e.g. boxes clipped away entirely) dropped; greedy NMS at
    ``nms_iou`` (``box_ops`` batched NMS); the first ``post_nms_top_k`` kept boxes in decreasing
    score order, the remaining rows all zero. Fixed shapes throughout; no weights.

    The candidate IoU matrix is pre_nms_top_k^2 and NMS loops pre_nms_top_k times: keep
    ~1000 / 500 (pre / post) on CPU; Faster R-CNN / FPN use ~2000 / 1000 on GPU (training) and
    ~1000 / 1000 at inference.
    """

    def __init__(self, anchors, pre_nms_top_k: int = 1000, post_nms_top_k: int = 500,
                 nms_iou: float = 0.7, variances=box_ops.VARIANCES, min_size: float = 0.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        anchors = np.asarray(anchors, dtype=np.float32)
        if anchors.ndim != 2 or anchors.shape[-1] != 4 or len(anchors) == 0:
            raise ConfigError(f"anchors must be a non-empty (A, 4) array, got shape {anchors.shape}")
        if int(pre_nms_top_k) < 1 or int(post_nms_top_k) < 1:
            raise ConfigError(f"pre_nms_top_k and post_nms_top_k must be >= 1, got {pre_nms_top_k}, "
                              f"{post_nms_top_k}")
        if not 0.0 < float(nms_iou) <= 1.0:
            raise ConfigError(f"nms_iou must be in (0, 1], got {nms_iou}")
        if len(variances) != 4 or min(float(v) for v in variances) <= 0:
            raise ConfigError(f"variances must be 4 positive numbers, got {tuple(variances)}")
        if float(min_size) < 0:
            raise ConfigError(f"min_size must be >= 0, got {min_size}")
        self.anchors = anchors
        self.pre_nms_top_k = int(pre_nms_top_k)
        self.post_nms_top_k = int(post_nms_top_k)
        self.nms_iou = float(nms_iou)
        self.variances = tuple(float(v) for v in variances)
        self.min_size = float(min_size)

    def call(self, logits, deltas):
        logits = ops.cast(logits, "float32")
        deltas = ops.cast(deltas, "float32")
        n_anchors = self.anchors.shape[0]
        if logits.shape[-2] is not None and logits.shape[-2] != n_anchors:
            raise ValueError(f"the RPN predicts {logits.shape[-2]} anchors but the ProposalLayer has "
                             f"{n_anchors} (build the anchors with the model's image size and options)")
        scores = ops.sigmoid(ops.reshape(logits, (-1, n_anchors)))  # (B, A)
        k = min(n_anchors, self.pre_nms_top_k)
        top_scores, top = ops.top_k(scores, k)  # (B, k)
        top_deltas = ops.take_along_axis(deltas, top[..., None], axis=1)  # (B, k, 4)
        top_anchors = ops.take(ops.convert_to_tensor(self.anchors), top, axis=0)  # (B, k, 4)
        boxes = box_ops.clip_boxes(box_ops.decode_boxes(top_deltas, top_anchors, self.variances))
        big_enough = ops.logical_and(boxes[..., 2] - boxes[..., 0] > self.min_size,
                                     boxes[..., 3] - boxes[..., 1] > self.min_size)
        # Sigmoid scores are >= 0, so -1 marks the dropped boxes as below the NMS threshold of 0.
        nms_scores = ops.where(big_enough, top_scores, -1.0)
        kept, _ = box_ops._batched_nms(boxes, nms_scores, self.post_nms_top_k, self.nms_iou,
                                       score_threshold=0.0, pre_nms_top_k=k)
        proposals = ops.take_along_axis(boxes, ops.maximum(kept, 0)[..., None], axis=1)
        return ops.where((kept >= 0)[..., None], proposals, 0.0)

    def compute_output_shape(self, logits_shape, deltas_shape=None):
        return (logits_shape[0], self.post_nms_top_k, 4)

    def get_config(self):
        return {
            **super().get_config(),
            "anchors": self.anchors.tolist(),
            "pre_nms_top_k": self.pre_nms_top_k,
            "post_nms_top_k": self.post_nms_top_k,
            "nms_iou": self.nms_iou,
            "variances": list(self.variances),
            "min_size": self.min_size,
        }
