"""RoI feature pooling and the detection target layer of Mask R-CNN (He et al., ICCV 2017).

Mask R-CNN's second stage looks at each region of interest (RoI) through a fixed-size window of
feature values: RoIAlign samples the feature map bilinearly at continuous coordinates (no
rounding of the box to the grid, the "misalignment" RoIPool suffers from), and the FPN assigns
each RoI to one pyramid level by its size. Training also needs, per sampled RoI, a class, box
offsets and a mask target; the proposals come from the model itself, so those targets are built
in the graph (``DetectionTargets``). Everything here is written with ``keras.ops`` and fixed
shapes, so it runs on TensorFlow and JAX, eagerly, in a compiled graph and under ``jax.jit``;
on TensorFlow the sampling itself runs on TensorFlow's crop-and-resize kernel (see Kernels).

Conventions:
    * Feature maps and images are channels-last (B, H, W, C); H, W, C must be static.
    * Boxes are float32 ``(y_min, x_min, y_max, x_max)`` normalised to [0, 1] by the image
      height and width (as in :mod:`kseg.nn.box_ops`), batched as (B, R, 4); R static.
    * ``crop_and_resize`` uses the sampling points of ``tf.image.crop_and_resize``: pixel i sits at
      coordinate i, the box corner y1 maps to ``y1 * (H - 1)``, and crop row i (of h) samples
      ``y = y1 * (H - 1) + i * (y2 - y1) * (H - 1) / (h - 1)`` (the box centre when h = 1).
      Points with y outside [0, H - 1] (or x outside [0, W - 1]) give 0.
    * ``roi_align`` uses continuous coordinates in which pixel i covers [i, i + 1) and has its
      centre at i + 0.5, i.e. Detectron2's ``ROIAlign(aligned=True)``: in sample coordinates
      (pixel i at i) the box is ``y1 * H - 0.5 .. y2 * H - 0.5``. The box is split into
      oh x ow equal bins; each output value is the mean of sampling_ratio x sampling_ratio
      bilinear samples at the centres of a regular sub-grid of the bin. A sample with y < -1 or
      y > H (x < -1 or x > W) counts as 0; otherwise y is clipped into [0, H - 1] before the
      bilinear interpolation (Detectron2/Caffe2's rule). ``sampling_ratio`` is fixed: Detectron2's
      adaptive ``sampling_ratio=0`` (ceil(bin size) samples) would make the sample count depend
      on the data and is not offered.
    * Kernels (``kseg.nn.kernels`` chooses): on the TensorFlow backend ``tf.image.crop_and_resize``
      (``kseg.nn.tf_kernels``, which also expresses RoIAlign through it, about 8x faster on CPU);
      elsewhere the ``keras.ops`` twins here, with the same results. They gather the four
      neighbours of every sample from the flattened map with ``take``; no loops over RoIs.
      ``PyramidRoIAlign`` concatenates the flattened levels and gathers each RoI from its own
      level in a single pass.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
from keras import layers, ops

from kseg.core.errors import ConfigError
from kseg.nn import box_ops, tf_kernels
from kseg.nn.kernels import library_kernels

__all__ = [
    "DetectionTargets",
    "PyramidRoIAlign",
    "crop_and_resize",
    "detection_targets",
    "fpn_levels",
    "roi_align",
]

METHODS = ("bilinear", "nearest")


def _float(x):
    return ops.convert_to_tensor(x, dtype="float32")


def _pair(value, name: str) -> tuple[int, int]:
    """``value`` as a (height, width) pair of positive ints; one int means a square."""
    pair = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
    try:
        height, width = (int(v) for v in pair)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an int or a (height, width) pair, got {value!r}") from None
    if height < 1 or width < 1:
        raise ConfigError(f"{name} must be positive, got {value!r}")
    return height, width


def _static_map_shape(x, name: str) -> tuple[int, int, int]:
    """(H, W, C) of a (B, H, W, C) tensor; they must be known before running."""
    if len(x.shape) != 4:
        raise ValueError(f"{name} must be (batch, height, width, channels), got shape {x.shape}")
    height, width, channels = x.shape[1:]
    if None in (height, width, channels):
        raise ValueError(f"{name} needs static height, width and channels, got shape {x.shape}")
    return int(height), int(width), int(channels)


def _static_rois(boxes, dynamic_ok: bool = False):
    """R of boxes (B, R, 4); R must be static, except where TensorFlow's kernels run and the
    caller allows it (``dynamic_ok``: RoIAlign of the detections worth a mask), then it may be None."""
    if len(boxes.shape) != 3 or boxes.shape[-1] != 4 or (
            boxes.shape[1] is None and not (dynamic_ok and library_kernels())):
        raise ValueError(f"boxes must be (batch, rois, 4) with a static roi count, got {boxes.shape}")
    return boxes.shape[1]


def _as_float_map(x):
    x = ops.convert_to_tensor(x)
    if "float" not in keras.backend.standardize_dtype(x.dtype):
        x = ops.cast(x, "float32")
    return x


def _flatten_map(feature_map, height: int, width: int, channels: int):
    return ops.reshape(feature_map, (-1, height * width, channels))


# ----------------------------------------------------------------------------- sampling core


def _gather(flat, index):
    """Rows of ``flat`` (B, N, C) at ``index`` (B, R, h, w) int32 -> (B, R, h, w, C).

    One ``take`` of whole C-vectors from the (B * N, C) rows (``take_along_axis`` would expand
    the indices to every channel on TensorFlow, many times slower).
    """
    n_rows, channels = flat.shape[1], flat.shape[2]
    image = ops.cumsum(ops.ones_like(index[:, :1, :1, :1]), axis=0) - 1  # (B, 1, 1, 1): b
    return ops.take(ops.reshape(flat, (-1, channels)), index + image * n_rows, axis=0)


def _sample(flat, ys, xs, valid_y, valid_x, heights, widths, offsets, method: str):
    """Values at the grid ``ys`` x ``xs`` of every RoI, read from flattened maps.

    ``flat`` (B, N, C) holds one or more row-major flattened maps; RoI r reads the map of
    ``heights``/``widths`` (B, R) int32 that starts at row ``offsets`` (B, R) of ``flat``.
    ``ys`` (B, R, h) and ``xs`` (B, R, w) are sample coordinates with pixel i at i;
    ``valid_y``/``valid_x`` (same shapes) say which rows/columns are inside (others give 0).
    Coordinates are clipped into the map before interpolating. Returns (B, R, h, w, C).
    """
    max_y = ops.cast(heights - 1, "float32")[..., None]
    max_x = ops.cast(widths - 1, "float32")[..., None]
    ys = ops.minimum(ops.maximum(ys, 0.0), max_y)
    xs = ops.minimum(ops.maximum(xs, 0.0), max_x)
    base = offsets[..., None, None]
    row_stride = widths[..., None, None]
    valid = ops.logical_and(valid_y[..., :, None], valid_x[..., None, :])[..., None]

    def at(rows, cols):
        return _gather(flat, base + rows[..., :, None] * row_stride + cols[..., None, :])

    if method == "nearest":
        # Round half up (ys >= 0 here), as the C++ kernel's roundf does for these values.
        rows = ops.cast(ops.floor(ys + 0.5), "int32")
        cols = ops.cast(ops.floor(xs + 0.5), "int32")
        values = at(rows, cols)
        return ops.where(valid, values, ops.zeros_like(values))

    y0, x0 = ops.floor(ys), ops.floor(xs)
    wy = ops.cast(ys - y0, flat.dtype)[..., :, None, None]
    wx = ops.cast(xs - x0, flat.dtype)[..., None, :, None]
    y0, x0 = ops.cast(y0, "int32"), ops.cast(x0, "int32")
    y1 = ops.minimum(y0 + 1, heights[..., None] - 1)
    x1 = ops.minimum(x0 + 1, widths[..., None] - 1)
    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    values = top * (1 - wy) + bottom * wy
    return ops.where(valid, values, ops.zeros_like(values))


def _per_roi(boxes, value: int):
    """A (B, R) int32 tensor filled with ``value``, shaped like the boxes' leading axes."""
    return ops.zeros_like(boxes[..., 0], dtype="int32") + value


# ----------------------------------------------------------------------------- crop and resize


def _crop_coordinates(start, end, size: int, n: int):
    """``tf.image.crop_and_resize`` sample coordinates (B, R, n) along one axis of length size."""
    if n == 1:
        return (0.5 * (start + end) * (size - 1))[..., None]
    scale = (end - start) * (size - 1) / (n - 1)
    steps = np.arange(n, dtype=np.float32)
    return (start * (size - 1))[..., None] + steps * scale[..., None]


def crop_and_resize(images, boxes, crop_size, method: str = "bilinear"):
    """Crop every box of ``boxes`` (B, R, 4) out of image b of ``images`` (B, H, W, C), resized.

    Returns (B, R, h, w, C) for ``crop_size`` (h, w): the sampling points and the zero
    extrapolation of ``tf.image.crop_and_resize`` (see the module docstring), with
    ``method="bilinear"`` (float output; integer images are cast to float32) or ``"nearest"``
    (keeps the dtype, e.g. an int32 label image). Boxes may extend outside [0, 1] or be
    flipped (y1 > y2 crops upside down), as in TensorFlow.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    crop_h, crop_w = _pair(crop_size, "crop_size")
    images = ops.convert_to_tensor(images)
    if method == "bilinear":
        images = _as_float_map(images)
    height, width, channels = _static_map_shape(images, "images")
    boxes = _float(boxes)
    _static_rois(boxes)
    if library_kernels():
        return tf_kernels.crop_and_resize(images, boxes, (crop_h, crop_w), method)
    ys = _crop_coordinates(boxes[..., 0], boxes[..., 2], height, crop_h)
    xs = _crop_coordinates(boxes[..., 1], boxes[..., 3], width, crop_w)
    valid_y = ops.logical_and(ys >= 0.0, ys <= height - 1.0)
    valid_x = ops.logical_and(xs >= 0.0, xs <= width - 1.0)
    flat = _flatten_map(images, height, width, channels)
    return _sample(flat, ys, xs, valid_y, valid_x, _per_roi(boxes, height), _per_roi(boxes, width),
                   _per_roi(boxes, 0), method)


# ----------------------------------------------------------------------------- RoIAlign


def _check_align_options(output_size, sampling_ratio) -> tuple[tuple[int, int], int]:
    size = _pair(output_size, "output_size")
    if int(sampling_ratio) != sampling_ratio or int(sampling_ratio) < 1:
        raise ConfigError(f"sampling_ratio must be a positive int, got {sampling_ratio!r}")
    return size, int(sampling_ratio)


def _roi_align_flat(flat, boxes, heights, widths, offsets, output_size, sampling_ratio: int):
    """RoIAlign of ``boxes`` (B, R, 4) on flattened maps (see ``_sample`` for the layout)."""
    out_h, out_w = output_size
    n_rois = boxes.shape[1]
    height = ops.cast(heights, "float32")
    width = ops.cast(widths, "float32")
    # Sample g of n = out * sampling_ratio along an axis sits at fraction (g + 0.5) / n of the
    # box: bin g // sampling_ratio, sub-sample g % sampling_ratio, both at their centres.
    frac_y = ((np.arange(out_h * sampling_ratio) + 0.5) / (out_h * sampling_ratio)).astype(np.float32)
    frac_x = ((np.arange(out_w * sampling_ratio) + 0.5) / (out_w * sampling_ratio)).astype(np.float32)
    ys = (boxes[..., 0] * height - 0.5)[..., None] + ((boxes[..., 2] - boxes[..., 0]) * height)[..., None] * frac_y
    xs = (boxes[..., 1] * width - 0.5)[..., None] + ((boxes[..., 3] - boxes[..., 1]) * width)[..., None] * frac_x
    valid_y = ops.logical_and(ys >= -1.0, ys <= height[..., None])
    valid_x = ops.logical_and(xs >= -1.0, xs <= width[..., None])
    samples = _sample(flat, ys, xs, valid_y, valid_x, heights, widths, offsets, "bilinear")
    samples = ops.reshape(
        samples, (-1, n_rois, out_h, sampling_ratio, out_w, sampling_ratio, flat.shape[-1])
    )
    return ops.mean(samples, axis=(3, 5))


def roi_align(feature_map, boxes, output_size=(7, 7), sampling_ratio: int = 2):
    """RoIAlign (He et al. 2017) of ``boxes`` (B, R, 4) on ``feature_map`` (B, H, W, C).

    Returns (B, R, oh, ow, C): bin (i, j) of RoI r is the mean of ``sampling_ratio`` squared
    bilinear samples on a regular grid inside the bin, with Detectron2's ``aligned=True``
    coordinates (box in feature pixels = box * size - 0.5; details in the module docstring).
    The boxes are normalised, so the same boxes work on any level of a pyramid.
    """
    output_size, sampling_ratio = _check_align_options(output_size, sampling_ratio)
    feature_map = _as_float_map(feature_map)
    height, width, channels = _static_map_shape(feature_map, "feature_map")
    boxes = _float(boxes)
    _static_rois(boxes)
    if library_kernels():
        return tf_kernels.roi_align([feature_map], boxes, None, output_size, sampling_ratio)
    flat = _flatten_map(feature_map, height, width, channels)
    return _roi_align_flat(flat, boxes, _per_roi(boxes, height), _per_roi(boxes, width),
                           _per_roi(boxes, 0), output_size, sampling_ratio)


# ----------------------------------------------------------------------------- FPN levels


def _check_level_options(image_size, k0, canonical, min_level, max_level):
    image_h, image_w = _pair(image_size, "image_size")
    if not canonical > 0:
        raise ConfigError(f"canonical must be a positive size in pixels, got {canonical!r}")
    if int(min_level) > int(max_level):
        raise ConfigError(f"min_level ({min_level}) must not exceed max_level ({max_level})")
    return image_h, image_w


def fpn_levels(boxes, image_size, k0: int = 4, canonical: float = 224.0, min_level: int = 2,
               max_level: int = 5):
    """FPN pyramid level of every box (Lin et al. 2017, eq. 1), int32 with the boxes' leading shape.

    ``k = floor(k0 + log2(sqrt(h * w) / canonical))`` clipped to [min_level, max_level], with h, w
    the box size in input pixels (``image_size`` = (height, width)). A zero-size (padding) box
    gets ``min_level``. Computed as ``min_level`` plus the number of thresholds
    ``h * w >= (canonical * 2 ** (L - k0)) ** 2`` met for L = min_level + 1 .. max_level, which
    is the same rule without the rounding of a float log. The paper's canonical 224 suits
    ImageNet-sized objects; with small inputs (e.g. 256 px nuclei images) nearly every RoI lands
    on P2, so pass a smaller ``canonical`` (e.g. 224 * 256 / 1024 = 56) to use the pyramid.
    """
    image_h, image_w = _check_level_options(image_size, k0, canonical, min_level, max_level)
    boxes = _float(boxes)
    height = ops.maximum(boxes[..., 2] - boxes[..., 0], 0.0) * float(image_h)
    width = ops.maximum(boxes[..., 3] - boxes[..., 1], 0.0) * float(image_w)
    area = height * width
    level = ops.zeros_like(area, dtype="int32") + int(min_level)
    for candidate in range(int(min_level) + 1, int(max_level) + 1):
        threshold = (float(canonical) * 2.0 ** (candidate - int(k0))) ** 2
        level = level + ops.cast(area >= threshold, "int32")
    return level


@keras.saving.register_keras_serializable(package="kseg")
class PyramidRoIAlign(layers.Layer):
    """RoIAlign of each RoI on its FPN level: ``call([boxes, P2, P3, ...]) -> (B, R, oh, ow, C)``.

    ``boxes`` (B, R, 4) normalised; the maps (B, H_l, W_l, C) are consecutive levels starting at
    ``min_level`` (2 for P2), all with the same channel count. The level of each RoI comes from
    ``fpn_levels`` (``k0``, ``canonical``, clipped to the levels given); ``image_size`` (height,
    width) defaults to the first map's size times ``2 ** min_level`` (P2 is at stride 4). The
    levels are flattened and concatenated, and each RoI gathers its samples from its own level
    in one pass (fixed shapes, the cost of one RoIAlign rather than one per level).
    """

    def __init__(self, output_size=(7, 7), sampling_ratio: int = 2, image_size=None, k0: int = 4,
                 canonical: float = 224.0, min_level: int = 2, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.output_size, self.sampling_ratio = _check_align_options(output_size, sampling_ratio)
        self.image_size = None if image_size is None else _pair(image_size, "image_size")
        self.k0 = int(k0)
        self.canonical = float(canonical)
        self.min_level = int(min_level)
        _check_level_options(self.image_size or (1, 1), self.k0, self.canonical, 0, 0)

    def call(self, inputs):
        if not isinstance(inputs, (list, tuple)) or len(inputs) < 2:
            raise ValueError("PyramidRoIAlign takes [boxes, P_min_level, P_min_level+1, ...]")
        boxes = _float(inputs[0])
        _static_rois(boxes, dynamic_ok=True)
        maps = [_as_float_map(m) for m in inputs[1:]]
        shapes = [_static_map_shape(m, f"P{self.min_level + i}") for i, m in enumerate(maps)]
        channels = {c for _, _, c in shapes}
        if len(channels) != 1:
            raise ValueError(f"all pyramid levels need the same channel count, got {sorted(channels)}")
        image_size = self.image_size or (shapes[0][0] * 2 ** self.min_level,
                                         shapes[0][1] * 2 ** self.min_level)
        max_level = self.min_level + len(maps) - 1
        level = fpn_levels(boxes, image_size, self.k0, self.canonical, self.min_level, max_level)
        level = level - self.min_level
        if library_kernels():
            return tf_kernels.roi_align(maps, boxes, level, self.output_size, self.sampling_ratio)

        sizes = [h * w for h, w, _ in shapes]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
        heights = ops.take(np.array([h for h, _, _ in shapes], np.int32), level, axis=0)
        widths = ops.take(np.array([w for _, w, _ in shapes], np.int32), level, axis=0)
        offsets = ops.take(starts, level, axis=0)
        flat = ops.concatenate(
            [_flatten_map(m, h, w, c) for m, (h, w, c) in zip(maps, shapes)], axis=1
        )
        return _roi_align_flat(flat, boxes, heights, widths, offsets, self.output_size,
                               self.sampling_ratio)

    def get_config(self):
        return {
            **super().get_config(),
            "output_size": list(self.output_size),
            "sampling_ratio": self.sampling_ratio,
            "image_size": None if self.image_size is None else list(self.image_size),
            "k0": self.k0,
            "canonical": self.canonical,
            "min_level": self.min_level,
        }


# ----------------------------------------------------------------------------- detection targets


def _check_target_options(rois_per_image, positive_fraction, iou_threshold, mask_size, variances):
    n_rois = int(rois_per_image)
    if n_rois < 1:
        raise ConfigError(f"rois_per_image must be positive, got {rois_per_image!r}")
    if not 0.0 < float(positive_fraction) <= 1.0:
        raise ConfigError(f"positive_fraction must be in (0, 1], got {positive_fraction!r}")
    max_positives = int(n_rois * float(positive_fraction))
    if max_positives < 1:
        raise ConfigError(f"rois_per_image * positive_fraction = {n_rois * positive_fraction} "
                          "leaves no room for a positive RoI; raise either")
    if not 0.0 < float(iou_threshold) <= 1.0:
        raise ConfigError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")
    variances = tuple(float(v) for v in variances)
    if len(variances) != 4 or min(variances) <= 0:
        raise ConfigError(f"variances must be 4 positive numbers, got {variances}")
    return n_rois, max_positives, _pair(mask_size, "mask_size"), variances


def detection_targets(proposals, gt_boxes, gt_class_ids, gt_instance_ids, label_image,
                      rois_per_image: int = 200, positive_fraction: float = 0.25,
                      iou_threshold: float = 0.5, mask_size=(28, 28),
                      variances: Sequence[float] = box_ops.VARIANCES, seed=None) -> dict:
    """Sample RoIs from the proposals and build their class, box and mask targets (per image).

    Inputs: ``proposals`` (B, R, 4) (zero rows are padding), ``gt_boxes`` (B, T, 4),
    ``gt_class_ids`` (B, T) (0 = padding row, ignored everywhere), ``gt_instance_ids`` (B, T)
    and ``label_image`` (B, S_h, S_w) int (0 background, else instance ids). ``seed`` is
    anything ``keras.random.uniform`` takes (int, ``SeedGenerator``, None).

    The valid ground-truth boxes are appended to the proposals (so positives exist from the
    start of training). A candidate is positive when its best IoU with a valid gt box is >=
    ``iou_threshold`` and negative otherwise. Up to ``int(rois_per_image * positive_fraction)``
    positives are drawn at random, then negatives fill the rest; rows beyond the candidates
    available are zero padding. Random choice keeps fixed shapes: uniform keys, masked, top_k.

    Returns a dict, rows ordered positives, negatives, padding:
    ``rois`` (B, N, 4); ``target_class_ids`` (B, N) int32 (0 for negatives and padding);
    ``target_deltas`` (B, N, 4) (``box_ops.encode_boxes`` of the matched gt box against the roi
    with ``variances``; zeros elsewhere); ``target_masks`` (B, N, mh, mw) float32 in {0, 1}
    (the label image cropped to the roi by ``crop_and_resize(method="nearest")``, equal to the
    matched instance id; zeros elsewhere); ``roi_valid`` (B, N) float32 (1 for positive and
    negative rows, 0 for padding). No gradient flows through any output.
    """
    n_rois, max_positives, mask_size, variances = _check_target_options(
        rois_per_image, positive_fraction, iou_threshold, mask_size, variances
    )
    proposals, gt_boxes = _float(proposals), _float(gt_boxes)
    gt_class_ids = ops.cast(gt_class_ids, "int32")
    gt_instance_ids = ops.cast(gt_instance_ids, "int32")
    label_image = ops.cast(label_image, "int32")
    _static_rois(proposals)
    if _static_rois(gt_boxes) == 0:  # keep the reductions over T well defined
        gt_boxes = ops.pad(gt_boxes, [[0, 0], [0, 1], [0, 0]])
        gt_class_ids = ops.pad(gt_class_ids, [[0, 0], [0, 1]])
        gt_instance_ids = ops.pad(gt_instance_ids, [[0, 0], [0, 1]])

    gt_valid = gt_class_ids > 0  # (B, T)
    candidates = ops.concatenate([proposals, gt_boxes], axis=1)  # (B, K, 4)
    candidate_valid = ops.logical_and(
        ops.concatenate([ops.ones_like(proposals[..., 0], dtype="bool"), gt_valid], axis=1),
        box_ops.box_area(candidates) > 0.0,
    )
    iou = box_ops.pairwise_iou(candidates, gt_boxes)  # (B, K, T), batched broadcast
    iou = ops.where(gt_valid[:, None, :], iou, -1.0)
    best_iou = ops.max(iou, axis=-1)
    best_gt = ops.cast(ops.argmax(iou, axis=-1), "int32")
    positive = ops.logical_and(candidate_valid, best_iou >= float(iou_threshold))
    negative = ops.logical_and(candidate_valid, ops.logical_not(positive))

    n_candidates = int(candidates.shape[1])
    k_pos, k_neg = min(max_positives, n_candidates), min(n_rois, n_candidates)
    keys = keras.random.uniform(ops.shape(best_iou), seed=seed)  # [0, 1); -1 marks "not eligible"
    pos_keys, pos_order = ops.top_k(ops.where(positive, keys, -1.0), k_pos)
    neg_keys, neg_order = ops.top_k(ops.where(negative, keys, -1.0), k_neg)
    n_pos = ops.sum(ops.cast(pos_keys >= 0.0, "int32"), axis=-1, keepdims=True)  # (B, 1)
    n_neg = ops.minimum(ops.sum(ops.cast(neg_keys >= 0.0, "int32"), axis=-1, keepdims=True),
                        n_rois - n_pos)

    slots = ops.arange(n_rois, dtype="int32")[None, :] + ops.zeros_like(n_pos)  # (B, N)
    from_pos = slots < n_pos
    real = slots < n_pos + n_neg
    pos_index = ops.take_along_axis(pos_order, ops.minimum(slots, k_pos - 1), axis=-1)
    neg_index = ops.take_along_axis(neg_order, ops.clip(slots - n_pos, 0, k_neg - 1), axis=-1)
    index = ops.cast(ops.where(from_pos, pos_index, neg_index), "int32")

    rois = ops.take_along_axis(candidates, index[..., None], axis=1)
    rois = ops.where(real[..., None], rois, 0.0)
    gt_index = ops.take_along_axis(best_gt, index, axis=-1)
    matched = ops.take_along_axis(gt_boxes, gt_index[..., None], axis=1)
    class_ids = ops.where(from_pos, ops.take_along_axis(gt_class_ids, gt_index, axis=-1), 0)

    # Non-positive rows encode a unit box against itself, so no 0-size division ever happens.
    unit = ops.convert_to_tensor(np.array([0.0, 0.0, 1.0, 1.0], np.float32))
    safe_rois = ops.where(from_pos[..., None], rois, unit)
    safe_matched = ops.where(from_pos[..., None], matched, unit)
    deltas = box_ops.encode_boxes(safe_matched, safe_rois, variances)
    deltas = ops.where(from_pos[..., None], deltas, 0.0)

    instance = ops.where(from_pos, ops.take_along_axis(gt_instance_ids, gt_index, axis=-1), -1)
    crops = crop_and_resize(label_image[..., None], rois, mask_size, method="nearest")[..., 0]
    masks = ops.logical_and(ops.equal(crops, instance[..., None, None]), from_pos[..., None, None])

    return {
        "rois": ops.stop_gradient(rois),
        "target_class_ids": ops.cast(class_ids, "int32"),
        "target_deltas": ops.stop_gradient(deltas),
        "target_masks": ops.cast(masks, "float32"),
        "roi_valid": ops.cast(real, "float32"),
    }


@keras.saving.register_keras_serializable(package="kseg")
class DetectionTargets(layers.Layer):
    """Mask R-CNN's detection target layer (no weights): ``detection_targets`` in a model.

    ``call([proposals, gt_boxes, gt_class_ids, gt_instance_ids, label_image])`` returns the dict
    of ``detection_targets``; the random RoI sampling draws from the layer's ``SeedGenerator``
    (``seed``), whose state Keras carries through compiled training steps.
    """

    def __init__(self, rois_per_image: int = 200, positive_fraction: float = 0.25,
                 iou_threshold: float = 0.5, mask_size=(28, 28),
                 variances: Sequence[float] = box_ops.VARIANCES, seed=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.rois_per_image, _, self.mask_size, self.variances = _check_target_options(
            rois_per_image, positive_fraction, iou_threshold, mask_size, variances
        )
        self.positive_fraction = float(positive_fraction)
        self.iou_threshold = float(iou_threshold)
        self.seed = None if seed is None else int(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    def call(self, inputs):
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 5:
            raise ValueError("DetectionTargets takes [proposals, gt_boxes, gt_class_ids, "
                             "gt_instance_ids, label_image]")
        return detection_targets(
            *inputs, rois_per_image=self.rois_per_image, positive_fraction=self.positive_fraction,
            iou_threshold=self.iou_threshold, mask_size=self.mask_size, variances=self.variances,
            seed=self.seed_generator,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "rois_per_image": self.rois_per_image,
            "positive_fraction": self.positive_fraction,
            "iou_threshold": self.iou_threshold,
            "mask_size": list(self.mask_size),
            "variances": list(self.variances),
            "seed": self.seed,
        }
