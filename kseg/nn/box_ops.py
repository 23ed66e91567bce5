"""Box operations for the SSD detector (Liu et al., ECCV 2016), later shared with Mask R-CNN.

Detection heads predict offsets against a fixed grid of default boxes; training needs the grid,
the truth-to-default matching and the offset encoding, and inference needs the decoding and
non-maximum suppression. Keeping them in one place gives both detectors the same conventions.

Conventions:
    * Boxes are float32 in corner form ``(y_min, x_min, y_max, x_max)`` on the last axis,
      normalised to [0, 1] by the image height (y) and width (x). Center form is
      ``(cy, cx, h, w)`` in the same units. Any leading shape is allowed unless stated.
    * Class 0 is background; object classes are 1..C. Padding rows of a truth list have a
      label < 0 (e.g. -1).

Everything except ``default_boxes`` (a NumPy constant computed once from shapes) uses
``keras.ops`` only and keeps shapes fixed (no data-dependent boolean indexing), so it runs on the
TensorFlow and JAX backends, eagerly, in a ``tf.function`` graph or under ``jax.jit``. The one
exception is the NMS kernel: on the TensorFlow backend it is TensorFlow's NMS op
(``kseg.nn.tf_kernels``; ``kseg.nn.kernels`` chooses), with the same results and fixed-shape
outputs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from keras import ops

from kseg.core.boxes import iou_matrix
from kseg.nn import tf_kernels
from kseg.nn.kernels import library_kernels

VARIANCES = (0.1, 0.1, 0.2, 0.2)
"""SSD encoding variances for (cy, cx, h, w): they scale the offsets to roughly unit spread."""

SIZE_EPSILON = 1e-8
"""Smallest box height/width fed to ``log`` when encoding, so a zero-size box gives a finite offset."""

DEFAULT_ASPECT_RATIOS = (1.0, 2.0, 0.5)


def _float(x, xp=ops):
    if xp is np:
        return np.asarray(x, dtype=np.float32)
    return ops.convert_to_tensor(x, dtype="float32")


# ----------------------------------------------------------------------------- conversions


def corners_to_center(boxes, xp=ops):
    """``(y_min, x_min, y_max, x_max)`` -> ``(cy, cx, h, w)`` on the last axis (``xp``: see ``encode_boxes``)."""
    boxes = _float(boxes, xp)
    y_min, x_min, y_max, x_max = (boxes[..., i] for i in range(4))
    return xp.stack(
        [(y_min + y_max) * 0.5, (x_min + x_max) * 0.5, y_max - y_min, x_max - x_min], axis=-1
    )


def center_to_corners(boxes):
    """``(cy, cx, h, w)`` -> ``(y_min, x_min, y_max, x_max)`` on the last axis."""
    boxes = _float(boxes)
    cy, cx, h, w = (boxes[..., i] for i in range(4))
    return ops.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)


def box_area(boxes):
    """Area of corner boxes (leading shape kept); an inverted extent counts as zero."""
    boxes = _float(boxes)
    height = ops.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    width = ops.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return height * width


def _iou_matrix(a, b):
    """IoU of every box of ``a`` (..., N, 4) with every box of ``b`` (..., M, 4): (..., N, M)."""
    return iou_matrix(_float(a), _float(b), xp=ops)


def pairwise_iou(a, b):
    """IoU matrix (N, M) of corner boxes ``a`` (N, 4) and ``b`` (M, 4); zero-area boxes give 0."""
    return _iou_matrix(a, b)


def clip_boxes(boxes, low: float = 0.0, high: float = 1.0):
    """Clip every coordinate into [low, high] (the image, in normalised units by default)."""
    return ops.clip(_float(boxes), low, high)


# ----------------------------------------------------------------------------- SSD encoding


def encode_boxes(matched_truth, default_boxes, variances: Sequence[float] = VARIANCES, xp=ops):
    """SSD regression targets of corner boxes ``matched_truth`` against ``default_boxes``.

    Per box, with centers and sizes of truth (cy, cx, h, w) and default box (dy, dx, dh, dw):
    ``((cy - dy) / dh / v0, (cx - dx) / dw / v1, log(h / dh) / v2, log(w / dw) / v3)``.
    A truth height or width below ``SIZE_EPSILON`` is raised to it before the log, so a
    degenerate (e.g. all-zero) box encodes to a finite, large negative size offset instead of
    -inf; boxes at least that large round-trip exactly through ``decode_boxes``.
    ``matched_truth`` may have a leading batch axis ((B, N, 4) against (N, 4)). ``xp=np``
    computes in NumPy instead of ``keras.ops`` (float32 as well): a data generator's per-image
    targets then cost no eager backend calls.
    """
    truth = corners_to_center(matched_truth, xp)
    anchors = corners_to_center(default_boxes, xp)
    var = _float(variances, xp)
    d_cy, d_cx, d_h, d_w = (anchors[..., i] for i in range(4))
    height = xp.maximum(truth[..., 2], SIZE_EPSILON)
    width = xp.maximum(truth[..., 3], SIZE_EPSILON)
    return xp.stack(
        [
            (truth[..., 0] - d_cy) / d_h / var[0],
            (truth[..., 1] - d_cx) / d_w / var[1],
            xp.log(height / d_h) / var[2],
            xp.log(width / d_w) / var[3],
        ],
        axis=-1,
    )


def decode_boxes(offsets, default_boxes, variances: Sequence[float] = VARIANCES):
    """Corner boxes from SSD offsets (the inverse of ``encode_boxes``); offsets may be (B, N, 4)."""
    offsets = _float(offsets)
    anchors = corners_to_center(default_boxes)
    var = _float(variances)
    d_cy, d_cx, d_h, d_w = (anchors[..., i] for i in range(4))
    center = ops.stack(
        [
            d_cy + offsets[..., 0] * var[0] * d_h,
            d_cx + offsets[..., 1] * var[1] * d_w,
            d_h * ops.exp(offsets[..., 2] * var[2]),
            d_w * ops.exp(offsets[..., 3] * var[3]),
        ],
        axis=-1,
    )
    return center_to_corners(center)


# ----------------------------------------------------------------------------- default boxes


def _is_per_map(aspect_ratios) -> bool:
    return len(aspect_ratios) > 0 and isinstance(aspect_ratios[0], (list, tuple, np.ndarray))


def boxes_per_position(aspect_ratios=DEFAULT_ASPECT_RATIOS, extra_unit_box: bool = True):
    """Default boxes at each feature-map location: one per aspect ratio, plus the extra 1:1 box.

    ``aspect_ratios`` is one map's tuple (returns an int) or a per-map list of tuples (returns a
    list of ints, one per map), so a detection head knows how many boxes each location predicts.
    """
    if _is_per_map(aspect_ratios):
        return [boxes_per_position(ratios, extra_unit_box) for ratios in aspect_ratios]
    return len(aspect_ratios) + int(bool(extra_unit_box))


def ssd_scales(n_maps: int, min_scale: float = 0.2, max_scale: float = 0.9) -> np.ndarray:
    """The paper's scales ``s_k = s_min + (s_max - s_min)(k - 1)/(m - 1)``, k = 1..m (s_min if m = 1)."""
    if n_maps < 1:
        raise ValueError(f"need at least one feature map, got {n_maps}")
    if n_maps == 1:
        return np.array([min_scale], dtype=np.float64)
    return np.linspace(min_scale, max_scale, n_maps, dtype=np.float64)


def default_boxes(
    feature_shapes: Sequence[tuple[int, int]],
    image_size: tuple[int, int],
    scales: Sequence[float] | None = None,
    aspect_ratios=None,
    min_scale: float = 0.2,
    max_scale: float = 0.9,
    extra_unit_box: bool = True,
    clip: bool = True,
) -> np.ndarray:
    """The SSD default boxes of all feature maps, float32 (N, 4) corner boxes in NumPy.

    ``feature_shapes`` lists each map's (rows, cols). ``scales`` gives one scale per map (or
    m + 1 values, the last being s_{m+1}); by default they come from ``ssd_scales`` and
    s_{m+1} = 1.0. ``aspect_ratios`` is one tuple for every map or a per-map list of tuples
    (default (1, 2, 0.5) everywhere).

    A box of aspect ratio a at scale s has width ``s * sqrt(a)`` and height ``s / sqrt(a)``; with
    ``extra_unit_box`` each position also gets a 1:1 box of scale ``sqrt(s_k * s_{k+1})``. The box
    at row i, column j is centred at ``((i + 0.5) / rows, (j + 0.5) / cols)``.

    Ordering: map by map (as listed), then positions row-major (row i, then column j), then per
    position the aspect ratios in the order given followed by the extra 1:1 box. So
    N = sum(rows * cols * boxes_per_position) and box ``n`` of a head's flattened (rows, cols,
    boxes_per_position) output lines up with row ``n`` here.

    ``image_size`` (height, width) is checked but does not change the boxes: sizes stay in
    normalised units, so on a non-square image a box of aspect ratio a is ``a * width / height``
    wide per unit height in pixels (as in the paper, which uses square inputs). With ``clip``
    every coordinate is clipped into [0, 1].
    """
    if len(image_size) != 2 or min(int(image_size[0]), int(image_size[1])) < 1:
        raise ValueError(f"image_size must be (height, width) with positive sizes, got {image_size}")
    shapes = [(int(rows), int(cols)) for rows, cols in feature_shapes]
    n_maps = len(shapes)
    if n_maps == 0 or min(min(shape) for shape in shapes) < 1:
        raise ValueError(f"feature_shapes must list positive (rows, cols) pairs, got {feature_shapes}")

    if scales is None:
        scales = np.append(ssd_scales(n_maps, min_scale, max_scale), 1.0)
    else:
        scales = np.asarray(scales, dtype=np.float64).ravel()
        if scales.size == n_maps:
            scales = np.append(scales, 1.0)
        elif scales.size != n_maps + 1:
            raise ValueError(f"need {n_maps} (or {n_maps + 1}) scales, got {scales.size}")

    if aspect_ratios is None:
        aspect_ratios = DEFAULT_ASPECT_RATIOS
    per_map_ratios = aspect_ratios if _is_per_map(aspect_ratios) else [aspect_ratios] * n_maps
    if len(per_map_ratios) != n_maps:
        raise ValueError(f"need aspect ratios for {n_maps} maps, got {len(per_map_ratios)}")

    all_boxes = []
    for k, ((rows, cols), ratios) in enumerate(zip(shapes, per_map_ratios)):
        ratios = np.asarray(ratios, dtype=np.float64).ravel()
        if ratios.size and ratios.min() <= 0:
            raise ValueError(f"aspect ratios must be positive, got {ratios.tolist()}")
        heights = scales[k] / np.sqrt(ratios)
        widths = scales[k] * np.sqrt(ratios)
        if extra_unit_box:
            unit = np.sqrt(scales[k] * scales[k + 1])
            heights, widths = np.append(heights, unit), np.append(widths, unit)
        n_per = heights.size
        cy = (np.arange(rows) + 0.5) / rows
        cx = (np.arange(cols) + 0.5) / cols
        # (rows, cols, n_per) grids of every coordinate, broadcast instead of looping.
        center_y = np.broadcast_to(cy[:, None, None], (rows, cols, n_per))
        center_x = np.broadcast_to(cx[None, :, None], (rows, cols, n_per))
        half_h = np.broadcast_to(heights[None, None, :] / 2, (rows, cols, n_per))
        half_w = np.broadcast_to(widths[None, None, :] / 2, (rows, cols, n_per))
        corners = np.stack(
            [center_y - half_h, center_x - half_w, center_y + half_h, center_x + half_w], axis=-1
        )
        all_boxes.append(corners.reshape(-1, 4))
    boxes = np.concatenate(all_boxes, axis=0)
    if clip:
        boxes = np.clip(boxes, 0.0, 1.0)
    return boxes.astype(np.float32)


# ----------------------------------------------------------------------------- matching


def match_boxes(truth_boxes, truth_labels, default_boxes, iou_threshold: float = 0.5):
    """Assign truths to the default boxes of one image: (matched_boxes (N, 4), labels (N,) int32).

    The paper's rule: each default box takes its best-IoU truth when that IoU >= ``iou_threshold``,
    and each truth is also forced onto its single best default box even below the threshold; a
    forced match overrides a threshold match (two truths forcing the same box: the one with the
    higher IoU there wins). ``truth_boxes`` (T, 4), ``truth_labels`` (T,) ints 1..C; rows with a
    label <= 0 (padding, e.g. -1; 0 is background and cannot be an object) are ignored, so with
    no valid truth every label is 0. Unmatched (background) rows get the default box itself as
    their matched box, which ``encode_boxes`` turns into zero offsets.
    """
    truth_boxes = _float(truth_boxes)
    truth_labels = ops.cast(ops.convert_to_tensor(truth_labels), "int32")
    anchors = _float(default_boxes)
    n_truth, n_default = truth_boxes.shape[0], anchors.shape[0]
    if n_truth == 0:
        return anchors, ops.zeros((n_default,), dtype="int32")

    valid = truth_labels > 0  # (T,)
    iou = ops.where(valid[:, None], pairwise_iou(truth_boxes, anchors), -1.0)  # (T, N)

    best_truth = ops.argmax(iou, axis=0)  # (N,)
    best_truth_iou = ops.max(iou, axis=0)

    best_default = ops.argmax(iou, axis=1)  # (T,)
    forcing = ops.logical_and(
        ops.equal(best_default[:, None], ops.arange(n_default)[None, :]), valid[:, None]
    )  # (T, N): truth t is forced onto box n
    forced = ops.any(forcing, axis=0)
    forced_truth = ops.argmax(ops.where(forcing, iou, -2.0), axis=0)

    truth_index = ops.where(forced, forced_truth, best_truth)
    positive = ops.logical_or(forced, best_truth_iou >= iou_threshold)
    positive = ops.logical_and(positive, ops.take(valid, truth_index, axis=0))

    matched = ops.where(positive[:, None], ops.take(truth_boxes, truth_index, axis=0), anchors)
    labels = ops.where(positive, ops.take(truth_labels, truth_index, axis=0), 0)
    return matched, ops.cast(labels, "int32")


# ----------------------------------------------------------------------------- NMS


def _gather_boxes(boxes, indices):
    """``boxes`` (B, N, 4) at ``indices`` (B, K) -> (B, K, 4)."""
    return ops.take_along_axis(boxes, indices[..., None], axis=-2)


def _greedy_keep(candidates, eligible, iou_threshold):
    """Greedy NMS keep mask (B, k) of score-ordered ``candidates`` (B, k, 4), in ``keras.ops``.

    Computes the candidates' IoU matrix once and walks them in order with a fixed-length loop
    carrying the keep mask: candidate i, if still kept, drops every later candidate whose IoU
    with it exceeds ``iou_threshold``. (A fixed-point form, every pass one matrix product, took
    3x longer under ``jax.jit`` on CPU: XLA runs this loop's k small steps without overhead.)
    """
    k = candidates.shape[-2]
    positions = ops.arange(k)
    later = positions[None, :] > positions[:, None]  # (k, k): column after row
    suppresses = ops.logical_and(_iou_matrix(candidates, candidates) > iou_threshold, later)

    def visit(i, keep):
        kept_i = ops.take(keep, i, axis=-1)  # (B,)
        row = ops.take(suppresses, i, axis=-2)  # (B, k)
        return ops.logical_and(keep, ops.logical_not(ops.logical_and(kept_i[:, None], row)))

    return ops.fori_loop(0, k, visit, eligible)


def _kept_positions(keep, n_out: int):
    """Positions (B, n_out) of the first ``n_out`` True entries of ``keep`` (B, k), -1 padded."""
    k = keep.shape[-1]
    key = ops.where(keep, ops.cast(k - ops.arange(k), "float32"), 0.0)
    key_values, key_positions = ops.top_k(key, n_out)
    valid = ops.minimum(ops.sum(ops.cast(keep, "int32"), axis=-1), n_out)
    return ops.cast(ops.where(key_values > 0.0, key_positions, -1), "int32"), ops.cast(valid, "int32")


def _batched_nms(boxes, scores, max_output, iou_threshold, score_threshold, pre_nms_top_k,
                 rows_per_image: int = 1):
    """Greedy NMS of every image of a batch: (indices (B, max_output) int32, -1 padded; valid (B,)).

    ``boxes`` (B, N, 4); ``scores`` (B * rows_per_image, N): with several score rows per image
    (one per class), each row runs its own NMS over its image's boxes, without copying them.

    Takes the top ``k = min(N, pre_nms_top_k)`` candidates by score (equal scores: lower index
    first) and keeps, in that order, each eligible candidate (score >= ``score_threshold``) that
    no kept earlier candidate overlaps with an IoU strictly above ``iou_threshold``. The kernel is
    ``kseg.nn.kernels``' choice: TensorFlow's NMS op on the TensorFlow backend, ``_greedy_keep``
    elsewhere; both walk the candidates in the same order, so they agree up to float rounding of
    an IoU at the threshold.
    """
    boxes, scores = _float(boxes), _float(scores)
    n_boxes = boxes.shape[-2]
    max_output = int(max_output)
    k = min(int(n_boxes), int(pre_nms_top_k))
    if k == 0 or max_output == 0:
        empty = ops.cast(ops.zeros_like(scores[:, :0]), "int32")  # (B, 0), batch may be dynamic
        return ops.pad(empty, [[0, 0], [0, max_output]], constant_values=-1), ops.sum(empty, axis=-1)

    n_out = min(k, max_output)
    if library_kernels():
        indices, valid = tf_kernels.batched_nms(boxes, scores, n_out, iou_threshold, score_threshold, k,
                                                rows_per_image)
        return _pad_indices(indices, max_output), ops.cast(valid, "int32")

    eligible = scores >= score_threshold  # NaN scores compare False and are never kept
    ranked = ops.where(eligible, scores, float("-inf"))
    _, order = ops.top_k(ranked, k)  # (B, k) candidate indices, best first
    keep = ops.take_along_axis(eligible, order, axis=-1)
    if rows_per_image == 1:
        candidates = _gather_boxes(boxes, order)
    else:  # row r reads image r // rows_per_image: one gather from the flattened (B * N, 4) boxes
        row = ops.cumsum(ops.ones_like(order[:, :1]), axis=0) - 1  # (B * rows, 1)
        candidates = ops.take(ops.reshape(boxes, (-1, 4)), order + (row // rows_per_image) * n_boxes, axis=0)

    positions, valid = _kept_positions(_greedy_keep(candidates, keep, iou_threshold), n_out)
    indices = ops.take_along_axis(order, ops.maximum(positions, 0), axis=-1)
    indices = ops.cast(ops.where(positions >= 0, indices, -1), "int32")
    return _pad_indices(indices, max_output), valid


def _pad_indices(indices, max_output: int):
    """(B, n) kept indices -> (B, max_output), the extra columns -1."""
    n_out = indices.shape[-1]
    if n_out < max_output:
        indices = ops.pad(indices, [[0, 0], [0, max_output - n_out]], constant_values=-1)
    return indices


def non_max_suppression(
    boxes,
    scores,
    max_output: int = 100,
    iou_threshold: float = 0.45,
    score_threshold: float = 0.01,
    pre_nms_top_k: int = 400,
):
    """Single-class greedy NMS of one image: (indices (max_output,) int32, valid count int32).

    ``boxes`` (N, 4), ``scores`` (N,). Only the ``pre_nms_top_k`` best-scoring boxes are
    candidates; boxes scoring below ``score_threshold`` are never kept; a box is suppressed by a
    kept higher-scoring box when their IoU is strictly above ``iou_threshold``. The kept indices
    come first in decreasing score order, the rest of the fixed-size output is -1.
    """
    indices, valid = _batched_nms(
        _float(boxes)[None], _float(scores)[None], max_output, iou_threshold, score_threshold,
        pre_nms_top_k,
    )
    return indices[0], valid[0]


def batched_class_nms(
    boxes,
    class_scores,
    max_output: int = 100,
    iou_threshold: float = 0.45,
    score_threshold: float = 0.01,
    pre_nms_top_k: int = 400,
) -> dict:
    """Class-wise NMS per image, then the best ``max_output`` detections over all classes.

    ``boxes`` (B, N, 4) are shared by all classes; ``class_scores`` (B, N, C) with column 0 the
    background (skipped). Each class 1..C-1 of each image runs ``non_max_suppression`` (one
    batched NMS over all B * (C-1) pairs), so overlapping boxes of different classes are all kept.
    Returns fixed shapes: ``boxes`` (B, max_output, 4), ``scores`` (B, max_output), ``classes``
    (B, max_output) int32 and ``valid`` (B,) int32; detections come first in decreasing score
    order (equal scores: lower class, then lower box index first) and padding rows have box 0,
    score 0 and class 0.
    """
    boxes = _float(boxes)
    class_scores = _float(class_scores)
    n_classes = class_scores.shape[-1]
    max_output = int(max_output)
    batch_zeros = ops.zeros_like(class_scores[:, :1, 0])  # (B, 1): works with a dynamic batch
    if n_classes is None or n_classes < 2:
        if n_classes is None:
            raise ValueError("class_scores needs a static number of classes")
        scores = ops.pad(batch_zeros[:, :0], [[0, 0], [0, max_output]])
        return {
            "boxes": ops.pad(boxes[:, :0], [[0, 0], [0, max_output], [0, 0]]),
            "scores": scores,
            "classes": ops.cast(scores, "int32"),
            "valid": ops.cast(ops.sum(scores, axis=-1), "int32"),
        }

    # Every (image, class) pair is one row of a single batched NMS: no loop over classes.
    n_objects = n_classes - 1
    n_boxes = boxes.shape[-2]
    object_scores = ops.reshape(ops.transpose(class_scores[..., 1:], (0, 2, 1)), (-1, n_boxes))
    indices, _ = _batched_nms(
        boxes, object_scores, max_output, iou_threshold, score_threshold, pre_nms_top_k,
        rows_per_image=n_objects,
    )  # (B * (C-1), max_output): image b, class c at row b * (C-1) + c - 1
    kept = indices >= 0
    safe = ops.maximum(indices, 0)
    kept_scores = ops.where(kept, ops.take_along_axis(object_scores, safe, axis=-1), float("-inf"))
    all_scores = ops.reshape(kept_scores, (-1, n_objects * max_output))  # (B, (C-1) * max_output)
    all_boxes = _gather_boxes(boxes, ops.reshape(safe, (-1, n_objects * max_output)))
    all_ids = ops.cast(batch_zeros, "int32") + np.repeat(
        np.arange(1, n_classes, dtype=np.int32), max_output
    )[None, :]

    top_scores, top = ops.top_k(all_scores, max_output)
    detected = top_scores > float("-inf")
    out_boxes = ops.where(detected[..., None], _gather_boxes(all_boxes, top), 0.0)
    out_classes = ops.where(detected, ops.take_along_axis(all_ids, top, axis=-1), 0)
    return {
        "boxes": out_boxes,
        "scores": ops.where(detected, top_scores, 0.0),
        "classes": ops.cast(out_classes, "int32"),
        "valid": ops.sum(ops.cast(detected, "int32"), axis=-1),
    }


__all__ = [
    "SIZE_EPSILON",
    "VARIANCES",
    "batched_class_nms",
    "box_area",
    "boxes_per_position",
    "center_to_corners",
    "clip_boxes",
    "corners_to_center",
    "decode_boxes",
    "default_boxes",
    "encode_boxes",
    "match_boxes",
    "non_max_suppression",
    "pairwise_iou",
    "ssd_scales",
]
