"""kseg.metrics.masks: hand-computed examples and a slow per-pair reference on random label images."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kseg import metrics


def strip(pixels_true, pixels_pred, width=40):
    """Two 1 x width label images, object 1 on the listed pixel ranges of each."""
    true = np.zeros((1, width), np.int32)
    pred = np.zeros((1, width), np.int32)
    true[0, pixels_true] = 1
    pred[0, pixels_pred] = 1
    return true, pred


def reference_per_threshold(true, pred):
    """Slow reference: every (true, pred) pair by full-image masks, exact fractions."""
    true_ids = [i for i in np.unique(true) if i != 0]
    pred_ids = [j for j in np.unique(pred) if j != 0]
    if not true_ids and not pred_ids:
        return [Fraction(1)] * 10
    ious = {}
    for i in true_ids:
        for j in pred_ids:
            inter = int(np.logical_and(true == i, pred == j).sum())
            union = int(np.logical_or(true == i, pred == j).sum())
            ious[i, j] = Fraction(inter, union)
    out = []
    for pct in range(50, 100, 5):
        threshold = Fraction(pct, 100)
        matched_true = {i for (i, j), v in ious.items() if v > threshold}
        matched_pred = {j for (i, j), v in ious.items() if v > threshold}
        tp = len(matched_true)
        assert tp == len(matched_pred)  # matches above 0.5 are one-to-one
        fp, fn = len(pred_ids) - tp, len(true_ids) - tp
        out.append(Fraction(tp, tp + fp + fn))
    return out


def test_thresholds_are_integer_percents():
    assert metrics.THRESHOLD_PERCENTS == tuple(range(50, 100, 5))


def test_iou_exactly_0_6_hits_only_at_050_and_055():
    # true = pixels 0..3 (4 px), pred = pixels 1..4 (4 px): intersection 3, union 5, IoU = 0.6.
    # 0.6 > 0.50 and > 0.55, but not > 0.60: precision 1 at two thresholds, 0 at eight -> 2/10.
    true, pred = strip(slice(0, 4), slice(1, 5))
    assert metrics.iou_map(true, pred) == pytest.approx(0.2)
    expected = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    np.testing.assert_array_equal(metrics.iou_map_per_threshold(true, pred), expected)


@pytest.mark.parametrize("index", range(10))
def test_iou_exactly_on_each_threshold_is_not_a_hit(index):
    # Union 20, intersection pct/5 -> IoU exactly pct/100; hits only at the `index` lower ones.
    pct = metrics.THRESHOLD_PERCENTS[index]
    inter = pct // 5
    # true = pixels 0..19 (20 px); pred = first `inter` pixels of it: union 20.
    true, pred = strip(slice(0, 20), slice(0, inter))
    assert metrics.iou_map(true, pred) == pytest.approx(index / 10)


def test_false_positive_and_false_negative():
    # true: A = pixels 0..3 (id 1), B = pixels 10..13 (id 2).
    # pred: A exactly (id 1) and a spurious object at 20..23 (id 2); B is missed.
    # At every threshold TP = 1, FP = 1, FN = 1 -> precision 1/3 -> score 1/3.
    true = np.zeros((1, 30), np.int32)
    pred = np.zeros((1, 30), np.int32)
    true[0, 0:4], true[0, 10:14] = 1, 2
    pred[0, 0:4], pred[0, 20:24] = 1, 2
    assert metrics.iou_map(true, pred) == pytest.approx(1 / 3)
    # Airbus F2 = 5TP / (5TP + 4FN + FP) = 5 / (5 + 4 + 1) = 0.5 at every threshold.
    assert metrics.airbus_f2(true, pred) == pytest.approx(0.5)


def test_non_consecutive_and_huge_ids_give_the_same_score():
    true = np.zeros((1, 30), np.int32)
    pred = np.zeros((1, 30), np.int32)
    true[0, 0:4], true[0, 10:16] = 1, 2
    pred[0, 1:5], pred[0, 10:16] = 1, 2
    # Object 1: IoU 3/5 = 0.6 (hits at 0.50, 0.55); object 2: IoU 1 (hits everywhere).
    # Precision: 2/2 at 0.50, 0.55; at the other eight TP = 1, FP = 1, FN = 1 -> 1/3.
    expected = (2 * 1 + 8 * (1 / 3)) / 10
    assert metrics.iou_map(true, pred) == pytest.approx(expected)
    renamed_true = np.select([true == 1, true == 2], [3, 17], 0)
    renamed_pred = np.select([pred == 1, pred == 2], [2_000_000_000, 5], 0)  # forces np.unique
    assert metrics.iou_map(renamed_true, renamed_pred) == pytest.approx(expected)
    as_float = true.astype(np.float64)  # float ids also take the np.unique path
    assert metrics.iou_map(as_float, pred.astype(np.uint16)) == pytest.approx(expected)


def test_mixed_dtypes_bool_and_uint64():
    # true: object 1 = 2 px, object 2 = 2 px; pred: one 3 px object covering object 1 and one
    # pixel of object 2. IoU(1, pred) = 2/3 > 0.65 -> TP = 1, FN = 1 at 0.50..0.65 (precision
    # 1/2), nothing above -> (4 * 1/2) / 10 = 0.2.
    true = np.array([[0, 1, 1], [2, 2, 0]], np.uint64)
    pred = np.array([[0, 1, 1], [0, 1, 0]], bool)
    assert metrics.iou_map(true, pred) == pytest.approx(0.2)
    assert metrics.iou_map(pred, true) == pytest.approx(0.2)


def test_intersections_unions_and_iou_matrix():
    true = np.array([[3, 3, 0], [0, 17, 17]])
    pred = np.array([[5, 0, 0], [5, 17, 0]])
    inter, union, true_ids, pred_ids = metrics.intersections_unions(true, pred)
    np.testing.assert_array_equal(true_ids, [3, 17])
    np.testing.assert_array_equal(pred_ids, [5, 17])
    # 3 = {(0,0),(0,1)}, 17 = {(1,1),(1,2)}; pred 5 = {(0,0),(1,0)}, pred 17 = {(1,1)}.
    np.testing.assert_array_equal(inter, [[1, 0], [0, 1]])
    np.testing.assert_array_equal(union, [[3, 3], [4, 2]])
    iou, _, _ = metrics.iou_matrix(true, pred)
    np.testing.assert_allclose(iou, [[1 / 3, 0], [0, 1 / 2]])


def test_empty_rules():
    empty = np.zeros((4, 4), np.int32)
    some = empty.copy()
    some[1:3, 1:3] = 7
    assert metrics.iou_map(empty, empty) == 1.0
    assert metrics.iou_map(empty, some) == 0.0
    assert metrics.iou_map(some, empty) == 0.0
    np.testing.assert_array_equal(metrics.iou_map_per_threshold(empty, empty), np.ones(10))
    assert metrics.airbus_f2(empty, empty) == 1.0
    assert metrics.airbus_f2(empty, some) == 0.0
    assert metrics.airbus_f2(some, empty) == 0.0


def test_mean_iou_map():
    true, pred = strip(slice(0, 4), slice(1, 5))  # 0.2
    same = true.copy()  # 1.0
    assert metrics.mean_iou_map([(true, pred), (true, same)]) == pytest.approx(0.6)
    assert metrics.mean_iou_map(iter([(true, same)])) == 1.0
    with pytest.raises(ValueError):
        metrics.mean_iou_map([])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.iou_map(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.dice(np.zeros((2, 2)), np.zeros((3, 2)))


def test_tgs_iou_map():
    empty = np.zeros((1, 10), np.uint8)
    true, pred = strip(slice(0, 4), slice(1, 5), width=10)
    assert metrics.tgs_iou_map(empty, empty) == 1.0
    assert metrics.tgs_iou_map(true, empty) == 0.0
    assert metrics.tgs_iou_map(empty, pred) == 0.0
    # IoU 3/5 = 0.6 exceeds 0.50 and 0.55 only -> 2/10.
    assert metrics.tgs_iou_map(true, pred) == pytest.approx(0.2)
    # The whole mask is one object: two separate blobs identical on both sides score 1.
    two_blobs = np.array([[1, 1, 0, 0, 1, 1]], np.uint8)
    assert metrics.tgs_iou_map(two_blobs * 255, two_blobs.astype(bool)) == 1.0
    # IoU exactly 0.5 (2 of 4) exceeds no threshold.
    assert metrics.tgs_iou_map(np.array([[1, 1, 1, 1]]), np.array([[0, 1, 1, 0]])) == 0.0


def test_airbus_f2_worked_examples():
    # One pair with IoU 0.6: at 0.50, 0.55 TP = 1 -> 5/5 = 1; elsewhere TP = 0, FN = 1, FP = 1
    # -> 0 / (4 + 1) = 0. Mean 2/10.
    true, pred = strip(slice(0, 4), slice(1, 5))
    assert metrics.airbus_f2(true, pred) == pytest.approx(0.2)
    # Two true ships, one found exactly: TP = 1, FN = 1, FP = 0 -> 5 / (5 + 4) = 5/9.
    true = np.zeros((1, 20), np.int32)
    true[0, 0:3], true[0, 10:13] = 1, 2
    pred = np.where(true == 1, 9, 0)
    assert metrics.airbus_f2(true, pred) == pytest.approx(5 / 9)


def test_dice_and_iou_on_binary_masks():
    a, b = strip(slice(0, 4), slice(1, 5))
    # |a| = |b| = 4, |a and b| = 3: Dice 6/8, IoU 3/5.
    assert metrics.dice(a, b) == pytest.approx(0.75)
    assert metrics.iou(a, b) == pytest.approx(0.6)
    zero = np.zeros_like(a)
    assert metrics.dice(zero, zero) == 1.0 and metrics.iou(zero, zero) == 1.0
    assert metrics.dice(a, zero) == 0.0 and metrics.iou(zero, b) == 0.0


ID_CHOICES = [0, 0, 0, 1, 2, 5, 9, 300]


@st.composite
def label_pairs(draw):
    """A small label image and a prediction made by relabelling and flipping some of its pixels."""
    shape = draw(st.tuples(st.integers(1, 8), st.integers(1, 8)))
    true = draw(hnp.arrays(np.int32, shape, elements=st.sampled_from(ID_CHOICES)))
    relabel = dict(zip(ID_CHOICES[3:], draw(st.permutations(ID_CHOICES[3:]))))
    pred = np.vectorize(lambda v: relabel.get(int(v), 0), otypes=[np.int32])(true)
    noise = draw(hnp.arrays(np.int32, shape, elements=st.sampled_from(ID_CHOICES)))
    flip = draw(hnp.arrays(np.bool_, shape))
    return true, np.where(flip, noise, pred)


@settings(max_examples=300, deadline=None)
@given(pair=label_pairs())
def test_iou_map_matches_slow_reference(pair):
    true, pred = pair
    expected = reference_per_threshold(true, pred)
    got = metrics.iou_map_per_threshold(true, pred)
    np.testing.assert_allclose(got, [float(f) for f in expected], rtol=0, atol=1e-12)
    assert metrics.iou_map(true, pred) == pytest.approx(float(sum(expected) / 10))


def test_iou_map_matches_slow_reference_on_seeded_disks():
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:64, :64]
    for _ in range(5):
        true = np.zeros((64, 64), np.int32)
        pred = np.zeros((64, 64), np.int32)
        for k in range(1, 9):
            cy, cx, r = rng.integers(6, 58), rng.integers(6, 58), rng.integers(3, 7)
            true[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = k
            dy, dx = rng.integers(-2, 3, 2)
            r_pred = r + rng.integers(-1, 2)
            pred[(yy - cy - dy) ** 2 + (xx - cx - dx) ** 2 < r_pred**2] = 10 * k
        expected = reference_per_threshold(true, pred)
        assert metrics.iou_map(true, pred) == pytest.approx(float(sum(expected) / 10))
