"""Detection mAP: hand-computed VOC / COCO values, matching rules, edge cases, and a cross-check of
``coco_map`` against pycocotools' COCOeval on seeded random detections."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from kseg.core.boxes import pairwise_iou, xywh_to_xyxy, xyxy_to_xywh
from kseg.metrics.detection import (
    COCO_IOU_THRESHOLDS,
    average_precision,
    coco_map,
    detection_map,
    match_detections,
    per_class_ap,
    pycocotools_sets,
    voc_map,
)

A = [0.0, 0.0, 10.0, 10.0]
B = [20.0, 20.0, 30.0, 30.0]
FAR = [100.0, 100.0, 110.0, 110.0]


def image(boxes, labels, scores=None):
    out = {"boxes": np.asarray(boxes, dtype=float).reshape(-1, 4), "labels": np.asarray(labels, dtype=int)}
    if scores is not None:
        out["scores"] = np.asarray(scores, dtype=float)
    return out


# --- Box helpers and IoU -------------------------------------------------------------------------

def test_xywh_round_trip():
    xywh = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, 10.0, 2.5]])
    xyxy = xywh_to_xyxy(xywh)
    np.testing.assert_allclose(xyxy, [[1, 2, 4, 6], [0.5, 0, 10.5, 2.5]])
    np.testing.assert_allclose(xyxy_to_xywh(xyxy), xywh)
    assert xywh_to_xyxy(np.zeros((0, 4))).shape == (0, 4)


def test_pairwise_iou_no_plus_one():
    # Intersection 5 x 10 = 50, union 100 + 100 - 50 = 150 (no +1 on widths).
    iou = pairwise_iou([A], [[5.0, 0.0, 15.0, 10.0], B, A])
    np.testing.assert_allclose(iou, [[50 / 150, 0.0, 1.0]])
    assert pairwise_iou(np.zeros((0, 4)), [A]).shape == (0, 1)
    # Degenerate boxes have zero area; zero union gives 0, not nan.
    assert pairwise_iou([[1, 1, 1, 1]], [[1, 1, 1, 1]])[0, 0] == 0.0


# --- Matching ------------------------------------------------------------------------------------

def test_match_returns_original_order_and_duplicates_are_false_positives():
    # Both detections overlap A perfectly; the higher-scored one (given second) takes it.
    tp = match_detections([A, A], [0.3, 0.9], [A], 0.5)
    assert tp.tolist() == [False, True]


def test_match_equal_scores_keep_input_order():
    tp = match_detections([A, A], [0.5, 0.5], [A], 0.5)
    assert tp.tolist() == [True, False]


def test_match_threshold_is_inclusive_and_takes_best_unmatched_truth():
    half = [0.0, 0.0, 10.0, 5.0]  # IoU with A = 50 / 100 = 0.5 exactly.
    assert match_detections([half], [1.0], [A], 0.5).tolist() == [True]
    assert match_detections([half], [1.0], [A], 0.51).tolist() == [False]
    # Detection 1 (score .9) overlaps both truths, prefers A (IoU 1); detection 2 then gets B2.
    b2 = [0.0, 0.0, 10.0, 6.0]
    tp = match_detections([A, b2], [0.9, 0.8], [b2, A], 0.5)
    assert tp.tolist() == [True, True]


def test_match_ignored_truths():
    # The ignored truth absorbs a detection without making it a TP or an FP; regular truths win.
    tp, ign = match_detections([A, A, B], [0.9, 0.8, 0.7], [A, A], 0.5, truth_ignore=[True, False],
                               return_ignored=True)
    assert tp.tolist() == [True, False, False]
    assert ign.tolist() == [False, True, False]


def test_ignored_truths_in_map():
    # Truths: A (regular), B (ignored / "difficult"). Detections on B are left out, not FPs.
    truths = [{**image([A, B], [1, 1]), "ignore": np.array([False, True])}]
    dets = [image([B, A], [1, 1], [0.9, 0.8])]
    assert voc_map(dets, truths) == pytest.approx(1.0)
    # Without the ignore flag both truths count (n_truth = 2) and both are found.
    assert voc_map(dets, [image([A, B], [1, 1])]) == pytest.approx(1.0)
    # Ignoring A instead: only B counts; the detection on A is ignored too.
    truths_b = [{**image([A, B], [1, 1]), "ignore": np.array([True, False])}]
    assert voc_map(dets, truths_b) == pytest.approx(1.0)


# --- Hand-computed AP ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["voc", "coco"])
def test_perfect_detector_is_one(method):
    truths = [image([A, B], [1, 2]), image([FAR], [1])]
    dets = [image([B, A], [2, 1], [0.6, 0.7]), image([FAR], [1], [0.1])]
    assert detection_map(dets, truths, method=method) == pytest.approx(1.0)
    assert coco_map(dets, truths) == pytest.approx(1.0)


def test_false_positive_above_true_positive():
    # One truth; ranked detections: FP (0.9), TP (0.8).
    # precision = [0/1, 1/2], recall = [0, 1]; envelope = [0.5, 0.5].
    # VOC: sum over recall steps of step * envelope = (0 - 0) * 0.5 + (1 - 0) * 0.5 = 0.5.
    # COCO: recall threshold 0 -> first rank with recall >= 0 is rank 0 -> 0.5; every other
    # threshold -> rank 1 -> 0.5; AP = 0.5.
    dets = [image([FAR, A], [1, 1], [0.9, 0.8])]
    truths = [image([A], [1])]
    assert voc_map(dets, truths) == pytest.approx(0.5)
    assert detection_map(dets, truths, method="coco") == pytest.approx(0.5)


def test_false_positive_between_true_positives():
    # Two truths; ranked: TP (.9), FP (.8), TP (.7).
    # precision = [1, 1/2, 2/3], recall = [1/2, 1/2, 1]; envelope = [1, 2/3, 2/3].
    # VOC: 0.5 * 1 + 0 * 2/3 + 0.5 * 2/3 = 5/6.
    # COCO: recall thresholds 0.00..0.50 (51 of them) -> rank 0 -> 1; 0.51..1.00 (50) -> rank 2
    # -> 2/3; AP = (51 + 50 * 2/3) / 101.
    dets = [image([A, FAR, B], [1, 1, 1], [0.9, 0.8, 0.7])]
    truths = [image([A, B], [1, 1])]
    assert voc_map(dets, truths) == pytest.approx(5 / 6)
    assert detection_map(dets, truths, method="coco") == pytest.approx((51 + 50 * 2 / 3) / 101)
    tp = np.array([True, False, True])
    assert average_precision(tp[::-1], np.array([0.7, 0.8, 0.9]), 2, "voc") == pytest.approx(5 / 6)


def test_missed_truth_halves_recall():
    # Two truths, one found with precision 1: recall stops at 1/2.
    # VOC: 0.5 * 1 = 0.5. COCO: 51 recall thresholds <= 0.5 give 1, the 50 above give 0.
    dets = [image([A], [1], [0.9])]
    truths = [image([A, B], [1, 1])]
    assert voc_map(dets, truths) == pytest.approx(0.5)
    assert detection_map(dets, truths, method="coco") == pytest.approx(51 / 101)


def test_duplicates_are_false_positives():
    # Truths A, B; ranked: A (.9, TP), A again (.8, duplicate -> FP), B (.7, TP): same as 5/6.
    dets = [image([A, A, B], [1, 1, 1], [0.9, 0.8, 0.7])]
    truths = [image([A, B], [1, 1])]
    assert voc_map(dets, truths) == pytest.approx(5 / 6)
    # A duplicate ranked after full recall costs nothing.
    assert voc_map([image([A, A], [1, 1], [0.9, 0.1])], [image([A], [1])]) == pytest.approx(1.0)


def test_mean_over_classes_and_thresholds():
    # Class 1 perfect (AP 1), class 2 one FP above the TP (AP 0.5); class 3 only has detections
    # (no truth) and is left out of the mean, like COCOeval's -1.
    truths = [image([A, B], [1, 2])]
    dets = [image([A, FAR, B, FAR], [1, 2, 2, 3], [0.9, 0.8, 0.7, 0.99])]
    aps = per_class_ap(dets, truths)
    assert sorted(aps) == [1, 2]
    assert voc_map(dets, truths) == pytest.approx(0.75)
    # A detection of IoU 0.5 exactly counts at threshold 0.5 but not at 0.75.
    half = [0.0, 0.0, 10.0, 5.0]
    m = detection_map([image([half], [1], [1.0])], [image([A], [1])], iou_thresholds=(0.5, 0.75))
    assert m == pytest.approx(0.5)


def test_max_dets_is_per_image_per_class():
    # 3 FPs above the TP in class 1; with max_dets=2 the TP is dropped (AP 0); class 2 in the same
    # image is not affected by class 1's count.
    dets = [image([FAR, FAR, FAR, A, B], [1, 1, 1, 1, 2], [0.9, 0.8, 0.7, 0.6, 0.1])]
    truths = [image([A, B], [1, 2])]
    full = per_class_ap(dets, truths, max_dets=None)
    capped = per_class_ap(dets, truths, max_dets=2)
    assert full[1][0] == pytest.approx(0.25)
    assert capped[1][0] == 0.0
    assert capped[2][0] == pytest.approx(1.0)


# --- Edge cases ----------------------------------------------------------------------------------

def test_no_detections_is_zero():
    truths = [image([A], [1]), image([B], [2])]
    empty = [image(np.zeros((0, 4)), [], []), {"boxes": [], "labels": [], "scores": []}]
    assert voc_map(empty, truths) == 0.0
    assert coco_map(empty, truths) == 0.0


def test_no_truths_raises():
    dets = [image([A], [1], [0.9])]
    with pytest.raises(ValueError, match="no class has"):
        voc_map(dets, [image(np.zeros((0, 4)), [])])
    with pytest.raises(ValueError, match="no class has"):
        coco_map(dets, [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int)}])


def test_input_validation():
    with pytest.raises(ValueError, match="detection entries"):
        voc_map([], [image([A], [1])])
    with pytest.raises(ValueError, match="scores"):
        voc_map([image([A], [1], [0.1, 0.2])], [image([A], [1])])
    with pytest.raises(ValueError, match="method"):
        detection_map([image([A], [1], [0.1])], [image([A], [1])], method="auc")
    with pytest.raises(ValueError, match="n_truth"):
        average_precision([True], [0.5], 0)


# --- Cross-check against pycocotools -------------------------------------------------------------

def random_set(seed: int, n_images: int = 12, n_classes: int = 3):
    rng = np.random.default_rng(seed)
    detections, truths = [], []
    for i in range(n_images):
        t_boxes, t_labels, d_boxes, d_labels, d_scores = [], [], [], [], []
        for c in range(1, n_classes + 1):
            # Often no truth of a class in an image (and image 0 has none at all).
            n = 0 if i == 0 else int(rng.choice([0, 0, 1, 2, 3, 5]))
            xy = rng.uniform(0, 400, (n, 2))
            wh = rng.uniform(4, 120, (n, 2))
            boxes = np.concatenate([xy, xy + wh], axis=1)
            t_boxes.append(boxes)
            t_labels += [c] * n
            for box, size in zip(boxes, wh):
                for _ in range(rng.choice([0, 1, 1, 1, 2])):  # missed, found, found twice
                    jitter = rng.normal(0, 0.12, 4) * np.concatenate([size, size])
                    d_boxes.append(box + jitter)
                    d_labels.append(c)
                    d_scores.append(rng.uniform())
        n_fp = int(rng.integers(0, 8))
        xy = rng.uniform(0, 400, (n_fp, 2))
        d_boxes += list(np.concatenate([xy, xy + rng.uniform(4, 120, (n_fp, 2))], axis=1))
        d_labels += list(rng.integers(1, n_classes + 1, n_fp))
        d_scores += list(rng.uniform(size=n_fp))
        if i == 1:  # More than maxDets=100 detections of one class in one image.
            xy = rng.uniform(0, 400, (130, 2))
            d_boxes += list(np.concatenate([xy, xy + rng.uniform(4, 120, (130, 2))], axis=1))
            d_labels += [1] * 130
            d_scores += list(rng.uniform(size=130))
        # Some tied scores, to exercise the stable-sort tie-breaking.
        d_scores = np.round(np.asarray(d_scores, dtype=float), 2)
        truths.append(image(np.concatenate(t_boxes).reshape(-1, 4), t_labels))
        detections.append(image(np.asarray(d_boxes).reshape(-1, 4), d_labels, d_scores))
    return detections, truths


def cocoeval_stats(detections, truths, n_classes: int = 3) -> np.ndarray:
    gt_api, dt_api = pycocotools_sets(detections, truths, n_classes)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt_api, dt_api, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_coco_map_matches_cocoeval(seed):
    detections, truths = random_set(seed)
    stats = cocoeval_stats(detections, truths)
    assert 0.05 < stats[0] < 0.95  # A non-trivial case.
    assert coco_map(detections, truths) == pytest.approx(stats[0], abs=1e-6)
    ap50 = detection_map(detections, truths, iou_thresholds=(0.5,), method="coco", max_dets=100)
    assert ap50 == pytest.approx(stats[1], abs=1e-6)
    ap75 = detection_map(detections, truths, iou_thresholds=(0.75,), method="coco", max_dets=100)
    assert ap75 == pytest.approx(stats[2], abs=1e-6)
    # COCO's thresholds index 0 is exactly 0.5 (stats[1] selects it with ==).
    assert COCO_IOU_THRESHOLDS[0] == 0.5


def test_coco_map_matches_cocoeval_with_a_class_absent_from_truths():
    # Class 3 has detections but no truth anywhere: COCOeval gives it -1 and leaves it out.
    detections, truths = random_set(7)
    truths = [image(t["boxes"][t["labels"] != 3], t["labels"][t["labels"] != 3]) for t in truths]
    stats = cocoeval_stats(detections, truths)
    assert sorted(per_class_ap(detections, truths)) == [1, 2]
    assert coco_map(detections, truths) == pytest.approx(stats[0], abs=1e-6)
