"""TensorFlow-only detector kernels: greedy NMS and crop-and-resize / RoIAlign on TF's C++ ops.

TF-only on purpose (``kseg.nn.kernels`` decides when these run; the ``keras.ops`` twins in
``kseg.nn.box_ops`` and ``kseg.tasks.maskrcnn.roi_align`` run everywhere else). TensorFlow is
imported inside the functions, so importing kseg never needs it.

* ``batched_nms``: ``NonMaxSuppressionV5`` (the kernel of ``tf.image.non_max_suppression_padded``)
  per row of scores. Like the twin it walks boxes in decreasing score, equal scores lower index
  first (the kernel's priority-queue order), and an IoU strictly above the threshold suppresses.
* ``crop_and_resize``: ``tf.image.crop_and_resize`` with one box index per RoI.
* ``roi_align``: RoIAlign (Detectron2's ``aligned=True``, the twin's rule) as a crop-and-resize of
  ``sampling_ratio`` samples per bin followed by an average pool. The twin's sample grid is a
  regular grid, so it is a crop-and-resize grid once the box is moved to the kernel's corner-pixel
  convention; the twin's border rule (samples within one pixel outside the map take the edge value,
  farther ones count as 0) is the kernel's zero extrapolation on the map padded by one edge pixel
  on each side. Each RoI is cropped from its own pyramid level only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _nms_rows(boxes, priority, rows_per_image: int, max_output: int, iou_threshold: float, threshold):
    """``NonMaxSuppressionV5`` of every row: (kept (rows, max_output) int32, -1 padded; valid (rows,)).

    ``boxes`` (B, N, 4); ``priority`` (B * rows_per_image, N): row r runs over image
    ``r // rows_per_image``'s boxes, keeping boxes whose priority is above ``threshold``, best
    first (equal priorities: lower index first). One loop step per image, its rows side by side.
    """
    import tensorflow as tf

    n_boxes = priority.shape[-1]
    per_image = tf.reshape(priority, (-1, int(rows_per_image), n_boxes))

    def one_image(args):
        image_boxes, image_priority = args
        kept, valid = [], []
        for row in range(int(rows_per_image)):
            row_kept, _, row_valid = tf.raw_ops.NonMaxSuppressionV5(
                boxes=image_boxes, scores=image_priority[row], max_output_size=max_output,
                iou_threshold=float(iou_threshold), score_threshold=threshold, soft_nms_sigma=0.0,
                pad_to_max_output_size=True)
            kept.append(row_kept)
            valid.append(row_valid)
        return tf.stack(kept), tf.stack(valid)

    kept, valid = tf.map_fn(one_image, (boxes, per_image), fn_output_signature=(
        tf.TensorSpec([int(rows_per_image), max_output], tf.int32), tf.TensorSpec([int(rows_per_image)], tf.int32)))
    kept, valid = tf.reshape(kept, (-1, max_output)), tf.reshape(valid, (-1,))
    return tf.where(tf.range(max_output)[None, :] < valid[:, None], kept, -1), valid


def batched_nms(boxes, scores, max_output: int, iou_threshold: float, score_threshold: float,
                pre_nms_top_k: int, rows_per_image: int = 1):
    """``kseg.nn.box_ops._batched_nms`` on TensorFlow's NMS op (same arguments, same results).

    ``boxes`` (B, N, 4); ``scores`` (B * rows_per_image, N). Returns (indices (rows, n) int32 into
    N, -1 padded, n = min(N, pre_nms_top_k, max_output); valid (rows,)). The op walks the boxes
    in score order (equal scores: lower index first) and keeps a score >= ``score_threshold``
    (the op's test is strictly above, so it gets the next float down). When no row has more
    than ``pre_nms_top_k`` eligible boxes the cap changes nothing and the op runs on all of
    them; otherwise the cap is applied first with ``top_k`` (slow for large k on CPU, hence the
    test), and the op runs on the candidates' ranks.
    """
    import tensorflow as tf

    boxes = tf.convert_to_tensor(boxes, tf.float32)
    scores = tf.convert_to_tensor(scores, tf.float32)
    n_boxes = int(scores.shape[-1])
    k = min(n_boxes, int(pre_nms_top_k))
    n_out = min(k, int(max_output))
    below = float(np.nextafter(np.float32(score_threshold), np.float32(-np.inf)))

    def all_boxes():  # the op itself drops scores at or below ``below`` (and NaN)
        return _nms_rows(boxes, scores, rows_per_image, n_out, iou_threshold, below)

    if k == n_boxes:
        return all_boxes()
    eligible = scores >= score_threshold  # NaN is never eligible

    def top_candidates():
        _, order = tf.math.top_k(tf.where(eligible, scores, -np.inf), k)  # (rows, k), best first
        image_of_row = tf.range(tf.shape(scores)[0]) // int(rows_per_image)
        source = boxes if int(rows_per_image) == 1 else tf.gather(boxes, image_of_row)  # (rows, N, 4)
        candidates = tf.gather(source, order, batch_dims=1)
        rank = tf.cast(k - tf.range(k), tf.float32)  # exact for k < 2**24: a strict order
        priority = tf.where(tf.gather(eligible, order, batch_dims=1), rank[None, :], -1.0)
        positions, valid = _nms_rows(candidates, priority, 1, n_out, iou_threshold, 0.0)
        return tf.where(positions >= 0, tf.gather(order, tf.maximum(positions, 0), batch_dims=1), -1), valid

    too_many = tf.reduce_any(tf.math.count_nonzero(eligible, axis=-1) > k)
    return tf.cond(too_many, top_candidates, all_boxes)


def _flat_boxes(boxes):
    """(B, R, 4) boxes -> ((B * R, 4) boxes, (B * R,) image index of each)."""
    import tensorflow as tf

    n_rois = tf.shape(boxes)[1]
    image = tf.repeat(tf.range(tf.shape(boxes)[0]), n_rois)
    return tf.reshape(boxes, (-1, 4)), image, n_rois


def crop_and_resize(images, boxes, crop_size: tuple[int, int], method: str):
    """``tf.image.crop_and_resize`` of ``boxes`` (B, R, 4) on ``images`` (B, H, W, C): (B, R, h, w, C).

    ``method="nearest"`` returns the images' dtype (TensorFlow computes in float32, exact for
    integer labels below 2**24); bilinear returns float32.
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(images)
    flat, image_index, n_rois = _flat_boxes(tf.cast(boxes, tf.float32))
    source = images if images.dtype.is_floating else tf.cast(images, tf.float32)
    crops = tf.image.crop_and_resize(source, flat, image_index, crop_size, method=method)
    if method == "nearest":
        crops = tf.cast(crops, images.dtype)
    return tf.reshape(crops, tf.concat([tf.shape(boxes)[:2], tf.shape(crops)[1:]], axis=0))


def _align_boxes(boxes, height: int, width: int, samples: tuple[int, int]):
    """RoIAlign boxes -> crop-and-resize boxes on the map padded by one pixel per side.

    RoIAlign sample g of n along y sits at ``y1 * H - 0.5 + (g + 0.5) * (y2 - y1) * H / n``
    (pixel i at i); on the padded map that is one more, and crop-and-resize maps a box corner
    c to ``c * (H + 1)``, so the first and last samples give the corners.
    """
    import tensorflow as tf

    n_y, n_x = samples
    y1, x1, y2, x2 = tf.unstack(boxes, axis=-1)
    step_y, step_x = (y2 - y1) * height / n_y, (x2 - x1) * width / n_x
    first_y, first_x = y1 * height + 0.5 * step_y + 0.5, x1 * width + 0.5 * step_x + 0.5
    last_y, last_x = first_y + (n_y - 1) * step_y, first_x + (n_x - 1) * step_x
    return tf.stack([first_y / (height + 1), first_x / (width + 1), last_y / (height + 1), last_x / (width + 1)],
                    axis=-1)


def roi_align(maps: Sequence, boxes, level, output_size: tuple[int, int], sampling_ratio: int):
    """RoIAlign of ``boxes`` (B, R, 4) on ``maps[level]`` (B, H_l, W_l, C each): (B, R, oh, ow, C).

    ``level`` (B, R) int32 indexes ``maps`` (all RoIs on map 0 when it is None).
    """
    import tensorflow as tf

    out_h, out_w = output_size
    samples = (out_h * sampling_ratio, out_w * sampling_ratio)
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    flat, image_index, n_rois = _flat_boxes(boxes)
    order = tf.range(tf.shape(flat)[0])
    if level is None or len(maps) == 1:
        parts = [(order, flat, image_index)]
    else:
        level = tf.reshape(tf.cast(level, tf.int32), (-1,))
        split = [tf.dynamic_partition(x, level, len(maps)) for x in (order, flat, image_index)]
        parts = list(zip(*split))
    pieces, positions = [], []
    for feature_map, (where, level_boxes, level_image) in zip(maps, parts):
        height, width = int(feature_map.shape[1]), int(feature_map.shape[2])
        padded = tf.pad(tf.cast(feature_map, tf.float32), [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
        crops = tf.image.crop_and_resize(padded, _align_boxes(level_boxes, height, width, samples), level_image,
                                         samples, method="bilinear")
        pieces.append(tf.nn.avg_pool2d(crops, (sampling_ratio, sampling_ratio), (sampling_ratio, sampling_ratio),
                                       "VALID"))
        positions.append(where)
    pooled = pieces[0] if len(pieces) == 1 else tf.dynamic_stitch(positions, pieces)
    channels = int(maps[0].shape[-1])
    return tf.reshape(pooled, tf.stack([tf.shape(boxes)[0], n_rois, out_h, out_w, channels]))


__all__ = ["batched_nms", "crop_and_resize", "roi_align"]
