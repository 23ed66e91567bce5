"""SSD box operations: conversions, IoU, encoding, default boxes, matching and NMS, checked
against hand-computed values and small NumPy references, on TensorFlow (eager and in a compiled
model) and once on JAX under ``jax.jit``."""

from __future__ import annotations

import textwrap

import keras
import numpy as np
import pytest
from backends import run_on_jax
from hypothesis import given, settings
from hypothesis import strategies as st

from kseg.nn.box_ops import (
    SIZE_EPSILON,
    _batched_nms,
    batched_class_nms,
    box_area,
    boxes_per_position,
    center_to_corners,
    clip_boxes,
    corners_to_center,
    decode_boxes,
    default_boxes,
    encode_boxes,
    match_boxes,
    non_max_suppression,
    pairwise_iou,
)

SSD300_SHAPES = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
SSD300_RATIOS = [(1, 2, 0.5), (1, 2, 0.5, 3, 1 / 3), (1, 2, 0.5, 3, 1 / 3), (1, 2, 0.5, 3, 1 / 3),
                 (1, 2, 0.5), (1, 2, 0.5)]


def to_np(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def random_boxes(rng: np.random.Generator, n: int, min_size: float = 0.01) -> np.ndarray:
    """Random valid corner boxes inside [0, 1]."""
    y0, x0 = rng.random(n) * 0.8, rng.random(n) * 0.8
    h = min_size + rng.random(n) * (1 - y0 - min_size)
    w = min_size + rng.random(n) * (1 - x0 - min_size)
    return np.stack([y0, x0, y0 + h, x0 + w], axis=-1).astype(np.float32)


def numpy_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Reference IoU matrix, one pair at a time."""
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a.astype(np.float64)):
        for j, q in enumerate(b.astype(np.float64)):
            ih = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            iw = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = ih * iw
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def numpy_greedy_nms(boxes, scores, max_output, iou_threshold, score_threshold, pre_nms_top_k=400):
    """Reference greedy NMS: the textbook loop over boxes in decreasing score order."""
    order = np.argsort(-scores, kind="stable")[:pre_nms_top_k]
    kept: list[int] = []
    for i in order:
        if scores[i] < score_threshold:
            continue
        if all(numpy_iou(boxes[[i]], boxes[[j]])[0, 0] <= iou_threshold for j in kept):
            kept.append(int(i))
    return kept[:max_output]


# ----------------------------------------------------------------------------- conversions, IoU


def test_center_corner_conversions_round_trip_and_hand_values():
    np.testing.assert_allclose(to_np(corners_to_center([0.1, 0.2, 0.5, 0.8])), [0.3, 0.5, 0.4, 0.6],
                               atol=1e-7)
    np.testing.assert_allclose(to_np(center_to_corners([0.3, 0.5, 0.4, 0.6])), [0.1, 0.2, 0.5, 0.8],
                               atol=1e-7)
    boxes = random_boxes(np.random.default_rng(0), 24).reshape(2, 3, 4, 4)
    center = to_np(corners_to_center(boxes))
    assert center.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(to_np(center_to_corners(center)), boxes, atol=1e-6)


def test_box_area_and_clip():
    areas = box_area([[0, 0, 0.5, 0.4], [0.2, 0.2, 0.2, 0.9], [0.5, 0.5, 0.4, 0.9]])
    np.testing.assert_allclose(to_np(areas), [0.2, 0.0, 0.0], atol=1e-7)
    clipped = to_np(clip_boxes([[-0.2, 0.1, 1.3, 0.9]]))
    np.testing.assert_allclose(clipped, [[0.0, 0.1, 1.0, 0.9]])
    np.testing.assert_allclose(to_np(clip_boxes([[-5.0, 3.0, 50.0, 7.0]], 0.0, 10.0)), [[0, 3, 10, 7]])


def test_pairwise_iou_hand_case_reference_and_zero_area():
    # Two unit squares overlapping by half: intersection 1/2, union 3/2.
    iou = to_np(pairwise_iou([[0.0, 0.0, 1.0, 1.0]], [[0.0, 0.5, 1.0, 1.5], [0.0, 0.0, 1.0, 1.0]]))
    np.testing.assert_allclose(iou, [[1 / 3, 1.0]], rtol=1e-6)

    rng = np.random.default_rng(1)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    iou = to_np(pairwise_iou(a, b))
    assert iou.shape == (7, 5)
    np.testing.assert_allclose(iou, numpy_iou(a, b), atol=1e-6)
    assert (iou > 0).any() and (iou < 1).all()

    # Zero-area boxes (a point, a line, the same point twice) give IoU 0, never NaN.
    zero = np.array([[0.5, 0.5, 0.5, 0.5], [0.2, 0.1, 0.2, 0.9]], np.float32)
    iou = to_np(pairwise_iou(zero, np.concatenate([zero, [[0, 0, 1, 1]]]).astype(np.float32)))
    assert not np.isnan(iou).any()
    np.testing.assert_array_equal(iou, np.zeros((2, 3)))


# ----------------------------------------------------------------------------- encoding


def test_encode_hand_value_and_zero_box_is_finite():
    anchor = [[0.4, 0.4, 0.6, 0.6]]  # centre (0.5, 0.5), size 0.2 x 0.2
    truth = [[0.32, 0.41, 0.72, 0.51]]  # centre (0.52, 0.46), size 0.4 x 0.1
    offsets = to_np(encode_boxes(truth, anchor))
    expected = [[0.02 / 0.2 / 0.1, -0.04 / 0.2 / 0.1, np.log(2.0) / 0.2, np.log(0.5) / 0.2]]
    np.testing.assert_allclose(offsets, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_np(decode_boxes(offsets, anchor)), truth, atol=1e-6)
    # Custom variances scale each component.
    np.testing.assert_allclose(to_np(encode_boxes(truth, anchor, variances=(1, 1, 1, 1))),
                               np.array(expected) * [0.1, 0.1, 0.2, 0.2], rtol=1e-5, atol=1e-6)
    # A zero-size truth is raised to SIZE_EPSILON before the log: finite offsets.
    zero = to_np(encode_boxes([[0.5, 0.5, 0.5, 0.5]], anchor))
    assert np.isfinite(zero).all()
    np.testing.assert_allclose(zero[0, 2:], np.log(SIZE_EPSILON / 0.2) / 0.2, rtol=1e-5)
    # In NumPy (xp=np, as the data generators use it): the same values, a float32 ndarray.
    in_numpy = encode_boxes(np.array(truth + [[0.5, 0.5, 0.5, 0.5]]), np.array(anchor * 2), xp=np)
    assert isinstance(in_numpy, np.ndarray) and in_numpy.dtype == np.float32
    np.testing.assert_allclose(in_numpy, np.concatenate([expected, zero]), rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=2**31 - 1), st.integers(min_value=1, max_value=9))
def test_encode_decode_round_trip(seed, n):
    rng = np.random.default_rng(seed)
    truth, anchors = random_boxes(rng, n, min_size=1e-3), random_boxes(rng, n, min_size=0.02)
    offsets = encode_boxes(truth, anchors)
    np.testing.assert_allclose(to_np(decode_boxes(offsets, anchors)), truth, atol=2e-6)
    # Batched: (B, N, 4) truths / offsets against (N, 4) default boxes.
    batch = np.stack([truth, random_boxes(rng, n, min_size=1e-3)])
    batch_offsets = to_np(encode_boxes(batch, anchors))
    assert batch_offsets.shape == (2, n, 4)
    np.testing.assert_allclose(batch_offsets[0], to_np(offsets), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(to_np(decode_boxes(batch_offsets, anchors)), batch, atol=2e-6)


# ----------------------------------------------------------------------------- default boxes


def test_ssd300_default_box_count_is_8732():
    boxes = default_boxes(SSD300_SHAPES, (300, 300), aspect_ratios=SSD300_RATIOS)
    assert boxes.shape == (8732, 4) and boxes.dtype == np.float32
    assert boxes_per_position(SSD300_RATIOS) == [4, 6, 6, 6, 4, 4]
    assert boxes_per_position((1, 2, 0.5)) == 4
    assert boxes_per_position((1, 2, 0.5), extra_unit_box=False) == 3
    assert sum(r * c * p for (r, c), p in zip(SSD300_SHAPES, boxes_per_position(SSD300_RATIOS))) == 8732
    assert boxes.min() >= 0.0 and boxes.max() <= 1.0
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()


def test_default_boxes_first_position_by_hand():
    boxes = default_boxes(SSD300_SHAPES, (300, 300), aspect_ratios=SSD300_RATIOS, clip=False)
    s1, s2 = 0.2, 0.2 + (0.9 - 0.2) / 5  # the paper's linear scales for m = 6 maps
    centre = 0.5 / 38
    root2 = np.sqrt(2.0)
    sizes = [  # (h, w): ratio 1, 2, 1/2, then the extra sqrt(s1 s2) square
        (s1, s1), (s1 / root2, s1 * root2), (s1 * root2, s1 / root2), (np.sqrt(s1 * s2),) * 2]
    expected = [[centre - h / 2, centre - w / 2, centre + h / 2, centre + w / 2] for h, w in sizes]
    np.testing.assert_allclose(boxes[:4], expected, atol=1e-6)
    # The next position is one column to the right (row-major), same sizes.
    shifted = np.array(expected) + np.array([0, 1, 0, 1]) / 38
    np.testing.assert_allclose(boxes[4:8], shifted, atol=1e-6)
    # The first box of the second map (19 x 19, scale s2) starts after 38 * 38 * 4 boxes.
    c2 = 0.5 / 19
    np.testing.assert_allclose(boxes[38 * 38 * 4], [c2 - s2 / 2, c2 - s2 / 2, c2 + s2 / 2, c2 + s2 / 2],
                               atol=1e-6)
    # The last box: the 1 x 1 map's extra square of scale sqrt(0.9 * 1.0), centred.
    half = np.sqrt(0.9) / 2
    np.testing.assert_allclose(boxes[-1], [0.5 - half, 0.5 - half, 0.5 + half, 0.5 + half], atol=1e-6)
    assert boxes.min() < 0 and boxes.max() > 1  # unclipped corners do leave the image


def test_default_boxes_options():
    one_map = default_boxes([(2, 3)], (64, 96), clip=False)  # one map: scale s_min = 0.2
    assert one_map.shape == (2 * 3 * 4, 4)
    cy, cx = (one_map[:, 0] + one_map[:, 2]) / 2, (one_map[:, 1] + one_map[:, 3]) / 2
    np.testing.assert_allclose(cy[::4], [0.25, 0.25, 0.25, 0.75, 0.75, 0.75], atol=1e-6)
    np.testing.assert_allclose(cx[::4], [1 / 6, 0.5, 5 / 6] * 2, atol=1e-6)
    np.testing.assert_allclose(one_map[0, 2] - one_map[0, 0], 0.2, atol=1e-6)
    np.testing.assert_allclose(one_map[3, 2] - one_map[3, 0], np.sqrt(0.2), atol=1e-6)  # s_2 = 1
    # Non-square images keep normalised units: the same boxes as a square image.
    np.testing.assert_array_equal(one_map, default_boxes([(2, 3)], (96, 96), clip=False))
    custom = default_boxes([(1, 1), (1, 1)], (8, 8), scales=[0.3, 0.6], aspect_ratios=(1,),
                           extra_unit_box=False)
    np.testing.assert_allclose(custom, [[0.35, 0.35, 0.65, 0.65], [0.2, 0.2, 0.8, 0.8]], atol=1e-6)
    with pytest.raises(ValueError):
        default_boxes([(2, 2)], (8, 8), scales=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        default_boxes([(2, 2), (1, 1)], (8, 8), aspect_ratios=[(1, 2)])


# ----------------------------------------------------------------------------- matching

# Hand-made default boxes: D0 a quarter, D1 slightly wider, D2 the opposite quarter.
DEFAULTS = np.array([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.6], [0.5, 0.5, 1.0, 1.0]], np.float32)


def test_match_forced_best_box_below_threshold():
    truth = np.array([[0.0, 0.0, 0.2, 0.2]], np.float32)  # IoU with D0 0.16, D1 0.13, D2 0
    assert numpy_iou(truth, DEFAULTS).max() < 0.5
    matched, labels = match_boxes(truth, np.array([5]), DEFAULTS)
    np.testing.assert_array_equal(to_np(labels), [5, 0, 0])
    assert to_np(labels).dtype == np.int32
    np.testing.assert_allclose(to_np(matched)[0], truth[0])
    # Background rows carry their own default box, so they encode to zero offsets.
    np.testing.assert_allclose(to_np(matched)[1:], DEFAULTS[1:])
    np.testing.assert_allclose(to_np(encode_boxes(matched, DEFAULTS))[1:], 0.0, atol=1e-6)


def test_match_threshold_and_forced_match_wins():
    truth_a = [0.0, 0.0, 0.5, 0.5]  # equals D0; IoU 0.83 with D1, a threshold match
    truth_b = [0.0, 0.45, 0.5, 0.65]  # best default box is D1 with IoU 0.23: forced there
    iou = numpy_iou(np.array([truth_a, truth_b]), DEFAULTS)
    assert iou[0, 1] >= 0.5 and iou[1].argmax() == 1 and iou[1, 1] < 0.5
    matched, labels = match_boxes(np.array([truth_a, truth_b], np.float32), np.array([1, 2]), DEFAULTS)
    np.testing.assert_array_equal(to_np(labels), [1, 2, 0])
    np.testing.assert_allclose(to_np(matched)[:2], [truth_a, truth_b])
    # Without truth B, D1 takes truth A by the threshold rule; a higher threshold drops it.
    _, labels = match_boxes(np.array([truth_a], np.float32), np.array([1]), DEFAULTS)
    np.testing.assert_array_equal(to_np(labels), [1, 1, 0])
    _, labels = match_boxes(np.array([truth_a], np.float32), np.array([1]), DEFAULTS, iou_threshold=0.9)
    np.testing.assert_array_equal(to_np(labels), [1, 0, 0])


def test_match_ignores_padding_and_handles_no_truth():
    truth = np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    _, labels = match_boxes(truth, np.array([3, -1, -1]), DEFAULTS)
    np.testing.assert_array_equal(to_np(labels), [3, 3, 0])  # the padding row equal to D2 is ignored
    _, labels = match_boxes(truth, np.array([-1, -1, -1]), DEFAULTS)
    np.testing.assert_array_equal(to_np(labels), [0, 0, 0])
    matched, labels = match_boxes(np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), DEFAULTS)
    np.testing.assert_array_equal(to_np(labels), [0, 0, 0])
    np.testing.assert_allclose(to_np(matched), DEFAULTS)


def test_match_on_ssd_grid():
    anchors = default_boxes([(4, 4), (2, 2)], (128, 128))
    truth = np.array([[0.1, 0.1, 0.45, 0.4], [0.6, 0.55, 0.98, 0.95], [0, 0, 0, 0]], np.float32)
    _, labels = match_boxes(truth, np.array([1, 2, -1]), anchors)
    labels = to_np(labels)
    iou = numpy_iou(truth[:2], anchors)
    best = iou.argmax(axis=0)
    expected = np.where(iou.max(axis=0) >= 0.5, best + 1, 0)
    expected[iou.argmax(axis=1)] = [1, 2]
    np.testing.assert_array_equal(labels, expected)
    assert (labels == 1).sum() >= 1 and (labels == 2).sum() >= 1


# ----------------------------------------------------------------------------- NMS


def test_nms_suppresses_overlap_keeps_separate_and_respects_score_threshold(kernels):
    boxes = np.array([[0.0, 0.0, 0.4, 0.4], [0.0, 0.02, 0.4, 0.42], [0.5, 0.5, 0.9, 0.9],
                      [0.6, 0.0, 0.9, 0.3]], np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.005], np.float32)
    indices, valid = non_max_suppression(boxes, scores, max_output=6)
    # Box 1 (best) suppresses box 0 (IoU 0.9); box 2 is separate; box 3 is below 0.01.
    np.testing.assert_array_equal(to_np(indices), [1, 2, -1, -1, -1, -1])
    assert to_np(indices).dtype == np.int32 and int(to_np(valid)) == 2
    indices, valid = non_max_suppression(boxes, scores, max_output=6, score_threshold=0.001)
    np.testing.assert_array_equal(to_np(indices), [1, 2, 3, -1, -1, -1])
    # A loose IoU threshold keeps the overlapping pair; max_output truncates.
    indices, valid = non_max_suppression(boxes, scores, max_output=2, iou_threshold=0.95)
    np.testing.assert_array_equal(to_np(indices), [1, 0])
    assert int(to_np(valid)) == 2
    # Nothing above the score threshold: all padding.
    indices, valid = non_max_suppression(boxes, scores * 0.001, max_output=3)
    np.testing.assert_array_equal(to_np(indices), [-1, -1, -1])
    assert int(to_np(valid)) == 0


def test_nms_matches_numpy_greedy_reference(kernels):
    rng = np.random.default_rng(7)
    for case in range(20):
        n = int(rng.integers(1, 60))
        centres = rng.random((n, 2)) * 0.6 + 0.2
        sizes = rng.random((n, 2)) * 0.3 + 0.05  # clustered boxes so that suppression happens
        boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1).astype(np.float32)
        scores = rng.random(n).astype(np.float32)
        iou_threshold = float(rng.choice([0.3, 0.45, 0.6]))
        max_output = int(rng.integers(1, 15))
        top_k = int(rng.choice([5, 400]))
        expected = numpy_greedy_nms(boxes, scores, max_output, iou_threshold, 0.2, top_k)
        indices, valid = non_max_suppression(boxes, scores, max_output, iou_threshold, 0.2, top_k)
        indices = to_np(indices)
        assert indices.shape == (max_output,), case
        assert int(to_np(valid)) == len(expected), case
        np.testing.assert_array_equal(indices, expected + [-1] * (max_output - len(expected)), str(case))


def test_nms_ties_keep_index_order_and_long_chains_settle(kernels):
    # A row of boxes, each overlapping the next at IoU 0.6 and the one after at 0.25: greedy NMS
    # at 0.5 keeps every other box (a chain of 29 suppressions, the keras.ops twin's worst case).
    n = 30
    starts = np.arange(n) * 0.25 / (n * 0.25 + 1)
    width = 1.0 / (n * 0.25 + 1)
    boxes = np.stack([np.zeros(n), starts, np.ones(n), starts + width], axis=-1).astype(np.float32)
    iou = numpy_iou(boxes[:3], boxes[:3])
    assert iou[0, 1] > 0.5 > iou[0, 2] > 0.0
    descending = np.linspace(0.9, 0.5, n).astype(np.float32)
    indices, valid = non_max_suppression(boxes, descending, max_output=n, iou_threshold=0.5)
    np.testing.assert_array_equal(to_np(indices)[: n // 2], np.arange(0, n, 2))
    assert int(to_np(valid)) == n // 2
    # Equal scores: the lower index comes first, so the result is the same as above.
    indices, valid = non_max_suppression(boxes, np.full(n, 0.7, np.float32), max_output=n, iou_threshold=0.5)
    np.testing.assert_array_equal(to_np(indices)[: n // 2], np.arange(0, n, 2))
    assert int(to_np(valid)) == n // 2


def numpy_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Reference IoU matrix in float64, broadcast (for reference NMS over many boxes)."""
    a, b = np.float64(a)[:, None], np.float64(b)[None]
    inter = (np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]))
             * np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])))
    union = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def test_nms_of_a_thousand_proposals_matches_the_reference(kernels):
    # The Mask R-CNN proposal case: 1000 small boxes, IoU 0.7, 500 kept at most, two images.
    rng = np.random.default_rng(11)
    centres = rng.random((2, 1000, 2))
    sizes = rng.random((2, 1000, 2)) * 0.08 + 0.01
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=-1).astype(np.float32)
    scores = rng.random((2, 1000)).astype(np.float32)
    scores[1, :300] = 0.5  # ties, resolved by index
    indices, valid = (to_np(x) for x in _batched_nms(boxes, scores, 500, 0.7, 0.0, 1000))
    for b in range(2):
        order = np.argsort(-scores[b], kind="stable")
        iou = numpy_iou_matrix(boxes[b], boxes[b])
        kept: list[int] = []
        for i in order:
            if not kept or iou[i, kept].max() <= 0.7:
                kept.append(int(i))
        kept = kept[:500]
        assert valid[b] == len(kept) and len(kept) > 100
        np.testing.assert_array_equal(indices[b, : len(kept)], kept)
        assert (indices[b, len(kept):] == -1).all()


def numpy_class_nms(boxes, class_scores, max_output, iou_threshold, score_threshold, pre_nms_top_k=400):
    """Reference for one image: (score, class, box index) of the best detections over classes."""
    found = []
    for c in range(1, class_scores.shape[-1]):
        kept = numpy_greedy_nms(boxes, class_scores[:, c], max_output, iou_threshold, score_threshold,
                                pre_nms_top_k)
        found += [(float(class_scores[i, c]), c, i) for i in kept]
    return sorted(found, key=lambda t: -t[0])[:max_output]


def test_batched_class_nms_is_class_wise_and_padded(kernels):
    boxes = np.array([[[0.0, 0.0, 0.4, 0.4], [0.0, 0.02, 0.4, 0.42], [0.5, 0.5, 0.9, 0.9]]], np.float32)
    scores = np.array([[[0.1, 0.9, 0.0], [0.1, 0.0, 0.8], [0.9, 0.0, 0.0]]], np.float32)
    out = batched_class_nms(boxes, scores, max_output=4)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "boxes": (1, 4, 4), "scores": (1, 4), "classes": (1, 4), "valid": (1,)}
    # Overlapping boxes of different classes are both kept; box 2 is background only.
    np.testing.assert_array_equal(to_np(out["classes"]), [[1, 2, 0, 0]])
    np.testing.assert_allclose(to_np(out["scores"]), [[0.9, 0.8, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(to_np(out["boxes"])[0], np.concatenate([boxes[0, :2], np.zeros((2, 4))]))
    np.testing.assert_array_equal(to_np(out["valid"]), [2])
    assert to_np(out["classes"]).dtype == np.int32 and to_np(out["valid"]).dtype == np.int32
    # The same two boxes in one class: the lower one is suppressed.
    same = scores.copy()
    same[0, 1, 1:] = [0.8, 0.0]
    out = batched_class_nms(boxes, same, max_output=4)
    np.testing.assert_array_equal(to_np(out["classes"]), [[1, 0, 0, 0]])
    np.testing.assert_array_equal(to_np(out["valid"]), [1])


@pytest.mark.parametrize("pre_nms_top_k", [400, 6])  # 6: the per-class cap binds (TF: the capped path)
def test_batched_class_nms_matches_reference_per_image(kernels, pre_nms_top_k):
    rng = np.random.default_rng(3)
    batch, n, n_classes, max_output = 3, 30, 4, 8
    centres = rng.random((batch, n, 2)) * 0.6 + 0.2
    sizes = rng.random((batch, n, 2)) * 0.3 + 0.05
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=-1).astype(np.float32)
    class_scores = rng.random((batch, n, n_classes)).astype(np.float32) ** 3
    out = batched_class_nms(boxes, class_scores, max_output, 0.45, 0.05, pre_nms_top_k)
    out = {k: to_np(v) for k, v in out.items()}
    for b in range(batch):
        expected = numpy_class_nms(boxes[b], class_scores[b], max_output, 0.45, 0.05, pre_nms_top_k)
        count = len(expected)
        assert out["valid"][b] == count
        np.testing.assert_allclose(out["scores"][b, :count], [t[0] for t in expected], rtol=1e-6)
        np.testing.assert_array_equal(out["classes"][b, :count], [t[1] for t in expected])
        np.testing.assert_allclose(out["boxes"][b, :count], boxes[b, [t[2] for t in expected]])
        assert (out["classes"][b, count:] == 0).all() and (out["scores"][b, count:] == 0).all()
        assert (out["boxes"][b, count:] == 0).all()


class _Detect(keras.layers.Layer):
    """Test layer: class-wise NMS and single-class NMS of the first class inside a model graph."""

    def call(self, boxes, class_scores):
        out = batched_class_nms(boxes, class_scores, max_output=5, score_threshold=0.05)
        single, _ = non_max_suppression(boxes[0], class_scores[0, :, 1], max_output=5)
        return out["boxes"], out["scores"], out["classes"], out["valid"], single[None]


def test_nms_runs_in_a_compiled_tf_model(kernels):
    rng = np.random.default_rng(5)
    n = 20
    centres = rng.random((2, n, 2)) * 0.6 + 0.2
    boxes = np.concatenate([centres - 0.1, centres + 0.1], axis=-1).astype(np.float32)
    class_scores = rng.random((2, n, 3)).astype(np.float32)
    box_in, score_in = keras.Input((n, 4)), keras.Input((n, 3))
    model = keras.Model([box_in, score_in], _Detect()(box_in, score_in))
    got = model.predict([boxes, class_scores], batch_size=2, verbose=0)
    eager = batched_class_nms(boxes, class_scores, max_output=5, score_threshold=0.05)
    for value, key in zip(got[:4], ["boxes", "scores", "classes", "valid"]):
        np.testing.assert_allclose(value, to_np(eager[key]), atol=1e-6)
    assert got[3].tolist() == [5, 5]
    single, _ = non_max_suppression(boxes[0], class_scores[0, :, 1], max_output=5)
    np.testing.assert_array_equal(got[4][0], to_np(single))


@pytest.mark.jax
def test_box_ops_under_jax_jit():
    pytest.importorskip("jax")
    code = textwrap.dedent(
        """
        import jax, keras, numpy as np
        from kseg.nn.box_ops import batched_class_nms, decode_boxes, encode_boxes, match_boxes
        assert keras.backend.backend() == "jax"
        defaults = np.array([[0, 0, .5, .5], [0, 0, .5, .6], [.5, .5, 1, 1]], np.float32)
        truth = np.array([[0, 0, .5, .5], [0, .45, .5, .65], [0, 0, 0, 0]], np.float32)
        labels = np.array([1, 2, -1], np.int32)

        @jax.jit
        def targets(truth, labels):
            matched, classes = match_boxes(truth, labels, defaults)
            offsets = encode_boxes(matched, defaults)
            return classes, decode_boxes(offsets[None], defaults)

        classes, decoded = targets(truth, labels)
        np.testing.assert_array_equal(np.asarray(classes), [1, 2, 0])
        np.testing.assert_allclose(np.asarray(decoded)[0], [truth[0], truth[1], defaults[2]], atol=1e-6)

        boxes = np.array([[[0, 0, .4, .4], [0, .02, .4, .42], [.5, .5, .9, .9]]], np.float32)
        scores = np.array([[[.1, .9, .0], [.1, .85, .8], [.9, .0, .0]]], np.float32)
        out = jax.jit(lambda b, s: batched_class_nms(b, s, max_output=4))(boxes, scores)
        np.testing.assert_array_equal(np.asarray(out["classes"]), [[1, 2, 0, 0]])
        np.testing.assert_allclose(np.asarray(out["scores"]), [[.9, .8, 0, 0]], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(out["boxes"])[0, :2], boxes[0, :2])
        np.testing.assert_array_equal(np.asarray(out["valid"]), [2])
        print("ok")
        """
    )
    run_on_jax(code)
