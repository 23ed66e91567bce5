"""kseg.tasks.maskrcnn.roi_align: crop-and-resize against ``tf.image.crop_and_resize``, RoIAlign against a
plain NumPy loop (Detectron2's per-bin, per-sample rule) and an analytic ramp, FPN levels by
hand, the pyramid's level choice, and the detection target layer's sampling and targets on a
hand-made label image; on TensorFlow (eager and in a compiled model) and on JAX under jax.jit."""

from __future__ import annotations

import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from backends import run_on_jax

from kseg.core.errors import ConfigError
from kseg.tasks.maskrcnn.roi_align import (
    DetectionTargets,
    PyramidRoIAlign,
    crop_and_resize,
    detection_targets,
    fpn_levels,
    roi_align,
)


def to_np(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


# -- NumPy references ------------------------------------------------------------------------------
def np_bilinear(fm: np.ndarray, y: float, x: float) -> np.ndarray:
    """Detectron2's ROIAlign bilinear sample of fm (H, W, C) at (y, x), pixel i at coordinate i."""
    height, width = fm.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(fm.shape[-1])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * fm[y_low, x_low] + hy * lx * fm[y_low, x_high]
            + ly * hx * fm[y_high, x_low] + ly * lx * fm[y_high, x_high])


def np_roi_align(fm: np.ndarray, boxes: np.ndarray, output_size, sampling_ratio: int) -> np.ndarray:
    """RoIAlign (aligned=True) of one map (H, W, C) and boxes (R, 4): per roi, bin and sample."""
    height, width = fm.shape[:2]
    out_h, out_w = output_size
    fm = fm.astype(np.float64)
    out = np.zeros((len(boxes), out_h, out_w, fm.shape[-1]))
    for r, (y1, x1, y2, x2) in enumerate(boxes.astype(np.float64)):
        start_y, start_x = y1 * height - 0.5, x1 * width - 0.5
        bin_h, bin_w = (y2 - y1) * height / out_h, (x2 - x1) * width / out_w
        for i in range(out_h):
            for j in range(out_w):
                total = np.zeros(fm.shape[-1])
                for iy in range(sampling_ratio):
                    y = start_y + i * bin_h + (iy + 0.5) * bin_h / sampling_ratio
                    for ix in range(sampling_ratio):
                        x = start_x + j * bin_w + (ix + 0.5) * bin_w / sampling_ratio
                        total += np_bilinear(fm, y, x)
                out[r, i, j] = total / sampling_ratio**2
    return out


def np_crop_nearest(image: np.ndarray, box, size) -> np.ndarray:
    """Nearest-neighbour crop of a 2-D image with tf.image.crop_and_resize's sampling points."""
    height, width = image.shape
    out = np.zeros(size, image.dtype)
    y1, x1, y2, x2 = np.float64(box)
    for i in range(size[0]):
        y = y1 * (height - 1) + i * (y2 - y1) * (height - 1) / (size[0] - 1)
        for j in range(size[1]):
            x = x1 * (width - 1) + j * (x2 - x1) * (width - 1) / (size[1] - 1)
            if 0 <= y <= height - 1 and 0 <= x <= width - 1:
                out[i, j] = image[int(np.floor(y + 0.5)), int(np.floor(x + 0.5))]
    return out


def np_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of corner boxes, one pair at a time."""
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(np.float64(a)):
        for j, q in enumerate(np.float64(b)):
            ih = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            iw = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - ih * iw
            out[i, j] = ih * iw / union if union > 0 else 0.0
    return out


def np_decode(deltas: np.ndarray, rois: np.ndarray, variances=(0.1, 0.1, 0.2, 0.2)) -> np.ndarray:
    """Faster R-CNN box decoding (center-size offsets scaled by the variances)."""
    d, r = np.float64(deltas), np.float64(rois)
    h, w = r[:, 2] - r[:, 0], r[:, 3] - r[:, 1]
    cy, cx = r[:, 0] + h / 2, r[:, 1] + w / 2
    cy, cx = cy + d[:, 0] * variances[0] * h, cx + d[:, 1] * variances[1] * w
    h, w = h * np.exp(d[:, 2] * variances[2]), w * np.exp(d[:, 3] * variances[3])
    return np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=-1)


def random_boxes(rng, shape, low=0.0, high=1.0, min_size=0.05) -> np.ndarray:
    y0, x0 = rng.uniform(low, high - min_size, size=(2,) + shape)
    y1 = y0 + rng.uniform(min_size, 1.0, size=shape) * (high - y0)
    x1 = x0 + rng.uniform(min_size, 1.0, size=shape) * (high - x0)
    return np.stack([y0, x0, np.maximum(y1, y0 + min_size), np.maximum(x1, x0 + min_size)],
                    axis=-1).astype(np.float32)


# -- crop_and_resize -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["bilinear", "nearest"])
@pytest.mark.parametrize("crop_size", [(5, 7), (1, 1), (1, 4)])
def test_crop_and_resize_matches_tensorflow(method, crop_size, kernels):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
    boxes = random_boxes(rng, (2, 6), low=-0.4, high=1.4)  # many partly outside the image
    boxes[0, 0] = [0.8, 0.9, 0.2, 0.1]  # flipped box: crops upside down
    boxes[1, 0] = [0.0, 0.0, 1.0, 1.0]
    got = to_np(crop_and_resize(images, boxes, crop_size, method=method))
    ref = tf.image.crop_and_resize(images, boxes.reshape(-1, 4), np.repeat(np.arange(2), 6),
                                   crop_size, method=method).numpy()
    assert got.shape == (2, 6) + crop_size + (3,)
    np.testing.assert_allclose(got, ref.reshape(got.shape), atol=1e-5)
    assert (got == 0).any() and (got != 0).any()  # the outside parts really are extrapolated


def test_crop_and_resize_nearest_keeps_int_labels_and_rejects_bad_options(kernels):
    label = np.arange(2 * 6 * 6, dtype=np.int32).reshape(2, 6, 6, 1)
    boxes = np.array([[[0, 0, 1, 1]], [[0.2, 0.2, 0.6, 0.8]]], np.float32)
    got = crop_and_resize(label, boxes, 6, method="nearest")
    assert keras.backend.standardize_dtype(got.dtype) == "int32"
    np.testing.assert_array_equal(to_np(got)[0, 0, ..., 0], label[0, ..., 0])  # identity crop
    np.testing.assert_array_equal(to_np(got)[1, 0, ..., 0], np_crop_nearest(label[1, ..., 0], boxes[1, 0], (6, 6)))
    # Sample points exactly half-way between pixels round up, as TensorFlow's kernel does.
    grid = np.arange(81, dtype=np.float32).reshape(1, 9, 9, 1)
    ties = np.array([[[1 / 16, 3 / 16, 15 / 16, 13 / 16], [0.5625, 0.0625, 0.8125, 0.3125]]], np.float32)
    ref = tf.image.crop_and_resize(grid, ties[0], [0, 0], (2, 2), method="nearest").numpy()
    np.testing.assert_array_equal(to_np(crop_and_resize(grid, ties, 2, method="nearest"))[0], ref)
    assert ref[0, 0, 0, 0] == 1 * 9 + 2  # (0.5, 1.5) -> pixel (1, 2)
    with pytest.raises(ConfigError, match="method"):
        crop_and_resize(label, boxes, 4, method="bicubic")
    with pytest.raises(ConfigError, match="crop_size"):
        crop_and_resize(label, boxes, (0, 4))


# -- roi_align -------------------------------------------------------------------------------------
@pytest.mark.parametrize("output_size, sampling_ratio", [((7, 7), 2), ((3, 5), 1), ((2, 2), 3)])
def test_roi_align_matches_numpy_loop(output_size, sampling_ratio, kernels):
    rng = np.random.default_rng(1)
    fm = rng.normal(size=(2, 12, 10, 3)).astype(np.float32)
    boxes = random_boxes(rng, (2, 5))
    boxes[0, 1] = [-0.3, 0.5, 0.4, 1.25]  # partly outside: far samples count as 0
    boxes[0, 2] = [0.31, 0.47, 0.33, 0.52]  # smaller than a pixel
    boxes[1, 0] = [0.9, 0.9, 1.0, 1.0]  # bottom-right corner: clipped samples
    boxes[1, 1] = [0.0, 0.0, 0.0, 0.0]  # padding row
    got = to_np(roi_align(fm, boxes, output_size, sampling_ratio))
    assert got.shape == (2, 5) + output_size + (3,)
    for b in range(2):
        np.testing.assert_allclose(got[b], np_roi_align(fm[b], boxes[b], output_size, sampling_ratio),
                                   atol=1e-5)


def test_roi_align_of_a_linear_ramp_is_the_ramp_at_bin_centres(kernels):
    # f(Y, X) = a Y + b X + c in continuous coordinates (pixel i covers [i, i + 1)): pixel values
    # are f at the centres (i + 0.5). Bilinear sampling of a linear map is exact and the samples
    # of a bin are symmetric about its centre, so each output is f at the bin centre.
    height, width = 16, 20
    coef = np.array([[0.5, -1.25, 3.0], [2.0, 0.75, -1.0]])  # (a, b, c) per channel
    yy, xx = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    fm = np.stack([a * yy + b * xx + c for a, b, c in coef], axis=-1)[None].astype(np.float32)
    boxes = np.array([[[0.1, 0.1, 0.9, 0.9], [0.2, 0.35, 0.5, 0.6], [0.4, 0.1, 0.45, 0.8]]],
                     np.float32)
    got = to_np(roi_align(fm, boxes, output_size=(7, 5), sampling_ratio=2))[0]
    for r, (y1, x1, y2, x2) in enumerate(np.float64(boxes[0])):
        cy = (y1 + (np.arange(7) + 0.5) * (y2 - y1) / 7) * height
        cx = (x1 + (np.arange(5) + 0.5) * (x2 - x1) / 5) * width
        for ch, (a, b, c) in enumerate(coef):
            expected = a * cy[:, None] + b * cx[None, :] + c
            np.testing.assert_allclose(got[r, ..., ch], expected, atol=2e-5)


def test_roi_align_gradient_reaches_the_features(kernels):
    # Every output averages samples whose bilinear weights sum to 1, so for boxes inside the map
    # the gradient of the sum of all outputs sums to R * oh * ow per channel.
    rng = np.random.default_rng(8)
    fm = tf.Variable(rng.normal(size=(2, 12, 10, 3)).astype(np.float32))
    boxes = random_boxes(rng, (2, 4), low=0.05, high=0.95)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(roi_align(fm, boxes, (7, 7), 2))
    grad = tape.gradient(total, fm)
    grad = tf.convert_to_tensor(grad).numpy()
    np.testing.assert_allclose(grad.sum(axis=(1, 2)), np.full((2, 3), 4 * 49.0), rtol=1e-5)
    assert (grad >= 0).all() and (grad > 0).mean() > 0.2


def test_roi_align_rejects_bad_options():
    fm, boxes = np.zeros((1, 4, 4, 1), np.float32), np.zeros((1, 2, 4), np.float32)
    with pytest.raises(ConfigError, match="sampling_ratio"):
        roi_align(fm, boxes, sampling_ratio=0)
    with pytest.raises(ConfigError, match="output_size"):
        roi_align(fm, boxes, output_size=(7, -1))


# -- FPN levels ------------------------------------------------------------------------------------
def test_fpn_levels_hand_cases():
    side = np.array([224, 223, 112, 111, 56, 28, 448, 447, 896, 2000, 0], np.float32) / 256
    boxes = np.stack([np.zeros_like(side), np.zeros_like(side), side, side], axis=-1)
    # k = floor(4 + log2(side / 224)) clipped to [2, 5]; a zero box goes to the lowest level.
    expected = [4, 3, 3, 2, 2, 2, 5, 4, 5, 5, 2]
    np.testing.assert_array_equal(to_np(fpn_levels(boxes[None], (256, 256))), [expected])
    # Non-square image: 112 px high (0.4375 * 256) by 448 px wide (0.875 * 512) -> sqrt = 224.
    assert int(to_np(fpn_levels([0.5, 0.0, 0.9375, 0.875], (256, 512)))) == 4
    # A smaller canonical size spreads small inputs over the pyramid: 56 px -> k0.
    np.testing.assert_array_equal(to_np(fpn_levels(boxes[:6], (256, 256), canonical=56)), [5, 5, 5, 4, 4, 3])
    np.testing.assert_array_equal(to_np(fpn_levels(boxes[:3], (256, 256), min_level=3, max_level=3)), [3, 3, 3])
    with pytest.raises(ConfigError, match="canonical"):
        fpn_levels(boxes, (256, 256), canonical=0)


def test_fpn_levels_match_the_log_formula_on_random_boxes():
    rng = np.random.default_rng(2)
    boxes = random_boxes(rng, (300,), min_size=0.005)
    h, w = (boxes[:, 2] - boxes[:, 0]) * 320.0, (boxes[:, 3] - boxes[:, 1]) * 480.0
    expected = np.clip(np.floor(4 + np.log2(np.sqrt(np.float64(h) * w) / 224)), 2, 5)
    np.testing.assert_array_equal(to_np(fpn_levels(boxes, (320, 480))), expected)


# -- PyramidRoIAlign -------------------------------------------------------------------------------
PYRAMID_SIZES = [(32, 32), (16, 16), (8, 8), (4, 4)]  # P2..P5 of a 128 x 128 input


def pyramid_maps(rng=None, channels=2):
    maps = []
    for level, (h, w) in enumerate(PYRAMID_SIZES, start=2):
        if rng is None:
            maps.append(np.full((2, h, w, channels), float(level), np.float32))
        else:
            maps.append(rng.normal(size=(2, h, w, channels)).astype(np.float32))
    return maps


def test_pyramid_roi_align_picks_each_rois_level(kernels):
    # canonical 56 on a 128 px image: 8 and 14 px -> P2, 28 -> P3, 56 and 60 -> P4, 112 -> P5.
    # Corners on multiples of 1/128 keep the box sizes exact in float32 (28/56/112 are boundaries).
    sides = np.array([[8, 14, 28, 56, 112, 60], [20, 40, 80, 120, 30, 0]], np.float32) / 128
    boxes = np.stack([0.0625 + 0 * sides, 0.03125 + 0 * sides, 0.0625 + sides, 0.03125 + sides], -1)
    boxes[1, 5] = 0.0  # a padding row
    layer = PyramidRoIAlign(output_size=(3, 3), canonical=56)
    got = to_np(layer([boxes] + pyramid_maps()))
    assert got.shape == (2, 6, 3, 3, 2)
    with np.errstate(divide="ignore"):
        expected = np.clip(np.floor(4 + np.log2(sides * 128 / 56)), 2, 5)  # zero box -> P2
    np.testing.assert_allclose(got, np.broadcast_to(expected[..., None, None, None], got.shape), atol=1e-6)
    assert set(expected[0]) == {2, 3, 4, 5}


def test_pyramid_roi_align_equals_roi_align_on_the_chosen_level_and_round_trips_config(kernels):
    rng = np.random.default_rng(3)
    maps = pyramid_maps(rng, channels=3)
    boxes = random_boxes(rng, (2, 40), min_size=0.02)
    layer = PyramidRoIAlign(output_size=(4, 4), sampling_ratio=2, canonical=40, image_size=(128, 128))
    got = to_np(layer([boxes] + maps))
    levels = to_np(fpn_levels(boxes, (128, 128), canonical=40))
    assert len(set(levels.ravel())) == 4
    per_level = np.stack([to_np(roi_align(m, boxes, (4, 4), 2)) for m in maps])  # (L, B, R, ...)
    expected = np.take_along_axis(per_level, (levels - 2)[None, ..., None, None, None], axis=0)[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)

    config = layer.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, PyramidRoIAlign) and restored.get_config() == config
    np.testing.assert_allclose(to_np(restored([boxes] + maps)), got, atol=1e-6)
    # The default image size is P2's size times 4.
    np.testing.assert_allclose(to_np(PyramidRoIAlign((4, 4), canonical=40)([boxes] + maps)), got, atol=1e-6)


# -- detection targets -----------------------------------------------------------------------------
SIZE = 64
INSTANCES = {3: 1, 4: 2, 7: 1, 9: 2}  # instance id -> class id
PAD_BOX = [0.02, 0.55, 0.3, 0.95]  # a padding gt row with a real-looking box, in an empty area


def label_scene():
    """Image 0: an L shape (3), a rectangle inside its box (4), a disc (7), a rectangle (9).
    Image 1: empty. Returns label image and padded gt arrays (T = 6)."""
    label = np.zeros((2, SIZE, SIZE), np.int32)
    label[0, 10:30, 8:12] = 3
    label[0, 26:30, 8:20] = 3
    label[0, 10:20, 14:20] = 4
    yy, xx = np.mgrid[:SIZE, :SIZE]
    label[0][(yy - 45) ** 2 + (xx - 44) ** 2 <= 100] = 7
    label[0, 40:52, 5:25] = 9
    gt_boxes = np.zeros((2, 6, 4), np.float32)
    gt_classes = np.zeros((2, 6), np.int32)
    gt_ids = np.zeros((2, 6), np.int32)
    for t, (instance, class_id) in enumerate(INSTANCES.items()):
        rows, cols = np.nonzero(label[0] == instance)
        gt_boxes[0, t] = [rows.min() / SIZE, cols.min() / SIZE, (rows.max() + 1) / SIZE,
                          (cols.max() + 1) / SIZE]
        gt_classes[0, t], gt_ids[0, t] = class_id, instance
    gt_boxes[0, 4] = PAD_BOX  # class 0: padding, must be ignored
    gt_boxes[1, 0] = [0.2, 0.2, 0.6, 0.6]  # padding row of the image with no objects
    return label, gt_boxes, gt_classes, gt_ids


def scene_proposals(rng, gt_boxes):
    """Image 0: 100 jittered gt boxes, 150 random boxes, 5 near-copies of PAD_BOX, 45 zero rows.
    Image 1: 150 random boxes and 150 zero rows."""
    proposals = np.zeros((2, 300, 4), np.float32)
    valid = gt_boxes[0, :4]
    jitter_base = valid[rng.integers(0, 4, 100)]
    size = np.concatenate([jitter_base[:, 2:] - jitter_base[:, :2]] * 2, axis=-1)
    proposals[0, :100] = np.clip(jitter_base + rng.normal(0, 0.08, (100, 4)) * size, 0, 1)
    proposals[0, 100:250] = random_boxes(rng, (150,), min_size=0.03)
    proposals[0, 250:255] = np.array(PAD_BOX) + rng.uniform(-1e-3, 1e-3, (5, 4))
    proposals[1, :150] = random_boxes(rng, (150,), min_size=0.03)
    return proposals


def check_targets(out, proposals, gt_boxes, gt_classes, rois_per_image=200, positive_fraction=0.25):
    """Counts, order, IoU rules, deltas and padding of every image against NumPy."""
    rois, classes, deltas = out["rois"], out["target_class_ids"], out["target_deltas"]
    masks, valid = out["target_masks"], out["roi_valid"]
    for b in range(len(rois)):
        gt_valid = gt_classes[b] > 0
        gts = gt_boxes[b][gt_valid]
        candidates = np.concatenate([proposals[b], gts])
        candidates = candidates[(candidates[:, 2] > candidates[:, 0]) & (candidates[:, 3] > candidates[:, 1])]
        cand_iou = np_iou(candidates, gts).max(axis=1) if len(gts) else np.zeros(len(candidates))
        n_pos = min(int((cand_iou >= 0.5).sum()), int(rois_per_image * positive_fraction))
        n_neg = min(int((cand_iou < 0.5).sum()), rois_per_image - n_pos)

        assert (classes[b] > 0).sum() == n_pos and valid[b].sum() == n_pos + n_neg
        np.testing.assert_array_equal(valid[b], np.arange(rois_per_image) < n_pos + n_neg)
        assert (classes[b, :n_pos] > 0).all() and (classes[b, n_pos:] == 0).all()

        real = rois[b, : n_pos + n_neg]
        # Every row is a distinct candidate.
        match = np.abs(real[:, None, :] - candidates[None, :, :]).max(-1) < 1e-6
        assert match.any(axis=1).all() and len(np.unique(match.argmax(axis=1))) == len(real)

        iou = np_iou(real, gts) if len(gts) else np.zeros((len(real), 1))
        assert (iou[:n_pos].max(axis=1) >= 0.5).all() and (iou[n_pos:].max(axis=1) < 0.5).all()
        if n_pos:
            best = iou[:n_pos].argmax(axis=1)
            np.testing.assert_array_equal(classes[b, :n_pos], gt_classes[b][gt_valid][best])
            np.testing.assert_allclose(np_decode(deltas[b, :n_pos], real[:n_pos]), gts[best], atol=1e-5)
        assert (deltas[b, n_pos:] == 0).all() and (masks[b, n_pos:] == 0).all()
        assert (rois[b, n_pos + n_neg:] == 0).all()
        assert set(np.unique(masks[b])) <= {0.0, 1.0}


def test_detection_targets_sampling_counts_iou_rules_deltas_and_padding():
    rng = np.random.default_rng(4)
    label, gt_boxes, gt_classes, gt_ids = label_scene()
    proposals = scene_proposals(rng, gt_boxes)
    out = {k: to_np(v) for k, v in detection_targets(proposals, gt_boxes, gt_classes, gt_ids, label, seed=1).items()}
    assert out["rois"].shape == (2, 200, 4) and out["target_masks"].shape == (2, 200, 28, 28)
    assert out["target_class_ids"].dtype == np.int32 and out["target_masks"].dtype == np.float32
    check_targets(out, proposals, gt_boxes, gt_classes)
    assert (out["target_class_ids"][0] > 0).sum() == 50  # capped at 25% of 200
    # The image without objects has only negatives, then padding (150 proposals < 200 rows).
    assert (out["target_class_ids"][1] == 0).all() and out["roi_valid"][1].sum() == 150
    # Padding gt rows never match: no roi near PAD_BOX is positive.
    near_pad = np_iou(out["rois"][0], np.array([PAD_BOX])).ravel() >= 0.5
    assert near_pad.any() and (out["target_class_ids"][0][near_pad] == 0).all()
    # Positive masks are not empty.
    positive_masks = out["target_masks"][0, :50]
    assert (positive_masks.reshape(50, -1).max(axis=1) == 1).all()


def test_detection_targets_masks_of_gt_boxes_are_the_resized_instance_masks(kernels):
    rng = np.random.default_rng(5)
    label, gt_boxes, gt_classes, gt_ids = label_scene()
    # Small proposals in the empty top-right corner: negatives only, so the positives are the
    # four appended gt boxes themselves.
    proposals = np.zeros((2, 20, 4), np.float32)
    proposals[:, :12] = random_boxes(rng, (2, 12), low=0.0, high=0.25, min_size=0.02) + [0, 0.7, 0, 0.7]
    for mask_size in [(28, 28), (14, 20)]:
        out = detection_targets(proposals, gt_boxes, gt_classes, gt_ids, label, rois_per_image=24,
                                positive_fraction=0.5, mask_size=mask_size, seed=3)
        out = {k: to_np(v) for k, v in out.items()}
        check_targets(out, proposals, gt_boxes, gt_classes, rois_per_image=24, positive_fraction=0.5)
        assert (out["target_class_ids"][0] > 0).sum() == 4
        for row in range(4):
            t = int(np.abs(gt_boxes[0, :4] - out["rois"][0, row]).max(axis=1).argmin())
            np.testing.assert_array_equal(out["rois"][0, row], gt_boxes[0, t])
            instance_mask = (label[0] == gt_ids[0, t]).astype(np.float32)
            expected = np_crop_nearest(instance_mask, gt_boxes[0, t], mask_size)
            np.testing.assert_array_equal(out["target_masks"][0, row], expected)
            tf_mask = tf.image.crop_and_resize(instance_mask[None, ..., None], gt_boxes[0, t][None], [0],
                                               mask_size, method="nearest").numpy()[0, ..., 0]
            np.testing.assert_array_equal(expected, tf_mask)
        # The L shape's box also covers instance 4: those pixels are not in 3's mask.
        t3 = list(INSTANCES).index(3)
        row3 = int(np.abs(out["rois"][0, :4] - gt_boxes[0, t3]).max(axis=1).argmin())
        assert 0 < out["target_masks"][0, row3].mean() < 0.6
        assert out["roi_valid"][1].sum() == 12 and (out["target_class_ids"][1] == 0).all()


def test_detection_targets_ignore_padding_gt_even_when_proposals_match_it():
    label = np.zeros((1, 32, 32), np.int32)
    gt_boxes = np.array([[PAD_BOX, [0, 0, 0, 0]]], np.float32)
    proposals = np.array([[PAD_BOX, PAD_BOX[:2] + [0.29, 0.94], [0, 0, 0, 0]]], np.float32)
    out = detection_targets(proposals, gt_boxes, np.zeros((1, 2), np.int32), np.zeros((1, 2), np.int32),
                            label, rois_per_image=8, seed=0)
    np.testing.assert_array_equal(to_np(out["target_class_ids"]), np.zeros((1, 8)))
    np.testing.assert_array_equal(to_np(out["roi_valid"]), [[1, 1, 0, 0, 0, 0, 0, 0]])
    assert not to_np(out["target_masks"]).any() and not to_np(out["target_deltas"]).any()


def test_detection_targets_layer_options_config_and_sampling_varies():
    with pytest.raises(ConfigError, match="positive_fraction"):
        DetectionTargets(positive_fraction=0.0)
    with pytest.raises(ConfigError, match="leaves no room"):
        DetectionTargets(rois_per_image=3, positive_fraction=0.25)
    layer = DetectionTargets(rois_per_image=64, mask_size=(14, 14), seed=7)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, DetectionTargets) and restored.get_config() == layer.get_config()

    rng = np.random.default_rng(6)
    label, gt_boxes, gt_classes, gt_ids = label_scene()
    proposals = scene_proposals(rng, gt_boxes)
    first, second = (to_np(layer([proposals, gt_boxes, gt_classes, gt_ids, label])["rois"]) for _ in range(2))
    assert first.shape == (2, 64, 4) and not np.array_equal(first, second)  # a fresh draw per call


def test_targets_and_pyramid_in_a_compiled_keras_model(kernels):
    rng = np.random.default_rng(7)
    label, gt_boxes, gt_classes, gt_ids = label_scene()
    proposals = scene_proposals(rng, gt_boxes)
    inputs = [keras.Input((300, 4)), keras.Input((6, 4)), keras.Input((6,), dtype="int32"),
              keras.Input((6,), dtype="int32"), keras.Input((SIZE, SIZE), dtype="int32")]
    # P2..P5 of a 64 x 64 input, each filled with its level number.
    feature_inputs = [keras.Input((SIZE // s, SIZE // s, 2)) for s in (4, 8, 16, 32)]
    targets = DetectionTargets(rois_per_image=100, mask_size=(14, 14), seed=0)(inputs)
    pooled = PyramidRoIAlign(output_size=(3, 3), canonical=28)([targets["rois"]] + feature_inputs)
    model = keras.Model(inputs + feature_inputs, {**targets, "pooled": pooled})
    maps = [np.full((2, SIZE // s, SIZE // s, 2), float(level), np.float32)
            for level, s in zip(range(2, 6), (4, 8, 16, 32))]
    out = model.predict([proposals, gt_boxes, gt_classes, gt_ids, label] + maps, batch_size=2, verbose=0)
    check_targets(out, proposals, gt_boxes, gt_classes, rois_per_image=100)
    levels = to_np(fpn_levels(out["rois"], (SIZE, SIZE), canonical=28))
    np.testing.assert_allclose(out["pooled"], np.broadcast_to(levels[..., None, None, None], out["pooled"].shape),
                               atol=1e-6)


@pytest.mark.jax
def test_roi_align_and_targets_under_jax_jit():
    pytest.importorskip("jax")
    code = textwrap.dedent(
        """
        import jax, keras, numpy as np
        from kseg.tasks.maskrcnn.roi_align import (DetectionTargets, PyramidRoIAlign, crop_and_resize,
                                           detection_targets, roi_align)
        assert keras.backend.backend() == "jax"
        # Linear ramp: RoIAlign gives the ramp at the bin centres.
        yy, xx = np.meshgrid(np.arange(16) + 0.5, np.arange(16) + 0.5, indexing="ij")
        fm = (2.0 * yy - 0.5 * xx + 1.0)[None, ..., None].astype(np.float32)
        boxes = np.array([[[0.25, 0.25, 0.75, 0.5]]], np.float32)
        got = np.asarray(jax.jit(lambda f, b: roi_align(f, b, (2, 2), 2))(fm, boxes))[0, 0, ..., 0]
        cy, cx = np.array([6.0, 10.0]), np.array([5.0, 7.0])  # bin centres in pixels
        np.testing.assert_allclose(got, 2.0 * cy[:, None] - 0.5 * cx[None, :] + 1.0, atol=1e-5)
        grad = jax.grad(lambda f: roi_align(f, boxes, (2, 2), 2).sum())(fm)
        np.testing.assert_allclose(np.asarray(grad).sum(), 4.0, rtol=1e-5)
        crop = jax.jit(lambda f, b: crop_and_resize(f, b, (3, 3), "nearest"))(fm, boxes)
        assert np.asarray(crop).shape == (1, 1, 3, 3, 1)
        maps = [np.full((1, 16 // 2 ** i, 16 // 2 ** i, 1), i + 2.0, np.float32) for i in range(4)]
        pooled = jax.jit(lambda b, *m: PyramidRoIAlign((2, 2), canonical=16)([b, *m]))(boxes, *maps)
        np.testing.assert_allclose(np.asarray(pooled), 4.0)  # 32 x 16 px box, sqrt 22.6 -> P4

        label = np.zeros((2, 32, 32), np.int32); label[0, 8:17, 4:20] = 5
        gt = np.array([[[8 / 32, 4 / 32, 17 / 32, 20 / 32], [0, 0, 0, 0]], [[0, 0, 0, 0]] * 2], np.float32)
        classes = np.array([[1, 0], [0, 0]], np.int32); ids = np.array([[5, 0], [0, 0]], np.int32)
        proposals = np.array([[[0.25, 0.125, 0.5, 0.6], [0.6, 0.6, 0.9, 0.9]]] * 2, np.float32)
        fn = jax.jit(lambda *a: detection_targets(*a, rois_per_image=8, mask_size=(8, 16), seed=3))
        out = {k: np.asarray(v) for k, v in fn(proposals, gt, classes, ids, label).items()}
        np.testing.assert_array_equal(out["target_class_ids"], [[1, 1, 0, 0, 0, 0, 0, 0], [0] * 8])
        np.testing.assert_array_equal(out["roi_valid"].sum(axis=1), [3, 2])
        exact = np.abs(out["rois"][0, :2] - gt[0, 0]).max(axis=1).argmin()
        np.testing.assert_array_equal(out["target_masks"][0, exact], np.ones((8, 16)))

        layer = DetectionTargets(rois_per_image=8, mask_size=(4, 4), seed=0)
        inputs = [proposals, gt, classes, ids, label]
        layer(inputs)
        step = jax.jit(lambda nt, *a: layer.stateless_call([], nt, list(a)))
        out, state = step([v.value for v in layer.non_trainable_variables], *inputs)
        np.testing.assert_array_equal(np.asarray(out["roi_valid"]).sum(axis=1), [3, 2])
        print("ok")
        """
    )
    run_on_jax(code)
