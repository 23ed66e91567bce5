"""Semantic class IoU, per-image scores by metric name, and the evaluators (mean score, detection
mAP): hand-computed values on small masks and boxes."""

from __future__ import annotations

import numpy as np
import pytest

from kseg.core.errors import DataError
from kseg.metrics import masks
from kseg.metrics.evaluators import DetectionScore, MeanScore, evaluate
from kseg.metrics.scores import class_iou, score_image


def block(shape, rows, cols, value=1, dtype=np.int32):
    out = np.zeros(shape, dtype)
    out[rows, cols] = value
    return out


# --- class_iou ----------------------------------------------------------------------------------

def test_class_iou_one_pixel_shift():
    truth = block((10, 10), slice(2, 6), slice(2, 6))        # 16 pixels
    predicted = block((10, 10), slice(2, 6), slice(3, 7))    # shifted one column right
    # Intersection 4 x 3 = 12, union 16 + 16 - 12 = 20.
    assert class_iou(truth, predicted) == pytest.approx(12 / 20, abs=1e-12)
    assert class_iou(truth, truth) == 1.0


def test_class_iou_shift_changes_the_value():
    truth = block((10, 10), slice(2, 6), slice(2, 6))
    exact = class_iou(truth, truth.astype(bool))
    shifted = class_iou(truth, np.roll(truth, 1, axis=0).astype(bool))
    assert exact == 1.0
    assert shifted == pytest.approx(12 / 20, abs=1e-12)
    assert shifted != exact


def test_class_iou_accepts_boolean_and_integer_predictions():
    truth = block((8, 8), slice(0, 4), slice(0, 4))
    predicted = block((8, 8), slice(0, 4), slice(0, 2))      # 8 of the 16 pixels
    assert class_iou(truth, predicted) == pytest.approx(8 / 16, abs=1e-12)
    assert class_iou(truth, predicted.astype(bool)) == pytest.approx(8 / 16, abs=1e-12)
    assert class_iou(truth, predicted * 255) == pytest.approx(8 / 16, abs=1e-12)


def test_class_iou_of_class_two_in_multiclass_truth():
    truth = np.zeros((10, 10), np.uint8)
    truth[0:3, 0:3] = 1   # class 1: 9 pixels
    truth[5:9, 5:8] = 2   # class 2: 12 pixels
    predicted = np.zeros((10, 10), bool)
    predicted[5:9, 5:9] = True   # 16 pixels covering class 2
    predicted[0:3, 0:3] = True   # 9 pixels on class 1: false positives for class 2
    # Class 2: intersection 12, union 12 + 25 - 12 = 25.
    assert class_iou(truth, predicted, score_class=2) == pytest.approx(12 / 25, abs=1e-12)
    # Class 1: intersection 9, union 9 + 25 - 9 = 25.
    assert class_iou(truth, predicted, score_class=1) == pytest.approx(9 / 25, abs=1e-12)


def test_class_iou_of_class_zero_compares_complements():
    truth = np.zeros((4, 4), np.uint8)
    truth[0:2, :] = 1              # truth == 0: rows 2 and 3, 8 pixels
    predicted = np.zeros((4, 4), bool)
    predicted[0:2, :] = True
    predicted[2, 0] = True         # background of the prediction: 7 pixels, all in rows 2-3
    # Intersection 7, union 8 + 7 - 7 = 8.
    assert class_iou(truth, predicted, score_class=0) == pytest.approx(7 / 8, abs=1e-12)
    # Class 1 of the same pair: intersection 8, union 8 + 9 - 8 = 9.
    assert class_iou(truth, predicted, score_class=1) == pytest.approx(8 / 9, abs=1e-12)


def test_class_iou_of_class_zero_with_partial_overlap():
    truth = np.ones((6, 6), np.uint8)
    truth[0:3, 0:3] = 0            # membrane pixels: 9
    predicted = np.ones((6, 6), bool)
    predicted[1:4, 1:4] = False    # predicted background: 9, shifted one pixel diagonally
    # Intersection 2 x 2 = 4, union 9 + 9 - 4 = 14.
    assert class_iou(truth, predicted, score_class=0) == pytest.approx(4 / 14, abs=1e-12)


def test_empty_masks_convention():
    empty = np.zeros((5, 5), bool)
    assert masks.iou(empty, empty) == 1.0
    assert class_iou(np.zeros((5, 5), np.uint8), empty) == 1.0
    # Class 0 is empty on both sides when the truth is all foreground and so is the prediction.
    assert class_iou(np.ones((5, 5), np.uint8), ~empty, score_class=0) == 1.0
    # One side empty gives 0.
    one = block((5, 5), 2, 2)
    assert class_iou(one, empty) == 0.0
    assert class_iou(np.zeros((5, 5), np.uint8), one) == 0.0


def test_class_iou_shape_mismatch_raises():
    with pytest.raises(ValueError):
        class_iou(np.zeros((4, 4), np.uint8), np.zeros((4, 5), bool))


# --- score_image --------------------------------------------------------------------------------

def test_score_image_iou_map_identical_labels():
    labels = np.zeros((16, 16), np.int32)
    labels[1:5, 1:5] = 1
    labels[8:12, 2:9] = 2
    labels[10:15, 11:15] = 3
    assert score_image(labels, labels, "iou_map") == 1.0
    # Renumbered predictions score the same.
    assert score_image(labels, np.where(labels > 0, 4 - labels, 0), "iou_map") == 1.0


def test_score_image_iou_map_one_pixel_shift():
    truth = block((10, 10), slice(2, 6), slice(2, 6))
    shifted = block((10, 10), slice(2, 6), slice(3, 7))
    # IoU 12 / 20 = 0.6 is strictly above 0.50 and 0.55 only: 2 of 10 thresholds.
    assert score_image(truth, shifted, "iou_map") == pytest.approx(2 / 10, abs=1e-12)


def test_score_image_mask_metrics():
    truth = block((10, 10), slice(2, 6), slice(2, 6))
    shifted = block((10, 10), slice(2, 6), slice(3, 7))
    assert score_image(truth, shifted, "dice") == pytest.approx(2 * 12 / 32, abs=1e-12)
    assert score_image(truth, shifted, "tgs_iou_map") == pytest.approx(2 / 10, abs=1e-12)
    assert score_image(truth, truth, "f2") == 1.0


def test_score_image_class_stack_is_mean_over_classes():
    truth = np.zeros((10, 10, 2), np.uint8)
    truth[2:6, 2:6, 0] = 1
    truth[0:2, 0:4, 1] = 1            # 8 pixels
    prediction = truth.copy()
    prediction[0:2, 2:4, 1] = 0       # 4 of the 8: dice 2 * 4 / 12
    expected = (1.0 + 8 / 12) / 2
    assert score_image(truth, prediction, "dice") == pytest.approx(expected, abs=1e-12)
    # A class that the prediction never mentions is an empty mask.
    assert score_image(truth, prediction[..., :1], "dice") == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("metric", ["iou", "map", "IOU_MAP", ""])
def test_score_image_unknown_metric_raises(metric):
    labels = np.zeros((4, 4), np.int32)
    with pytest.raises(DataError):
        score_image(labels, labels, metric)


# --- MeanScore / evaluate -----------------------------------------------------------------------

def test_mean_score_is_plain_mean_and_reset_clears():
    truth = block((10, 10), slice(2, 6), slice(2, 6))
    shifted = block((10, 10), slice(2, 6), slice(3, 7))   # 3/5
    elsewhere = block((10, 10), slice(7, 9), slice(7, 9))  # 0
    evaluator = MeanScore(class_iou, "iou")
    assert evaluator.names == ("iou",)
    evaluator.reset()
    evaluator.process(truth, truth)
    evaluator.process(truth, shifted)
    evaluator.process(truth, elsewhere)
    result = evaluator.evaluate()
    assert list(result) == ["iou"]
    assert result["iou"] == pytest.approx((1 + 3 / 5 + 0) / 3, abs=1e-12)
    evaluator.reset()
    evaluator.process(truth, shifted)
    assert evaluator.evaluate() == {"iou": pytest.approx(3 / 5, abs=1e-12)}


def test_evaluate_runs_over_pairs_and_resets_first():
    truth = block((10, 10), slice(2, 6), slice(2, 6))
    shifted = block((10, 10), slice(2, 6), slice(3, 7))
    evaluator = MeanScore(class_iou, "iou")
    evaluator.process(truth, np.zeros_like(truth))   # stale score, cleared by evaluate()
    result = evaluate(evaluator, [truth, truth], [truth, shifted])
    assert result == {"iou": pytest.approx((1 + 3 / 5) / 2, abs=1e-12)}


def test_evaluate_length_mismatch_raises():
    truth = block((4, 4), slice(0, 2), slice(0, 2))
    with pytest.raises(ValueError):
        evaluate(MeanScore(class_iou, "iou"), [truth, truth], [truth])
    with pytest.raises(ValueError):
        evaluate(MeanScore(class_iou, "iou"), [truth], [truth, truth])


# --- DetectionScore -----------------------------------------------------------------------------

BOX = [0.0, 0.0, 10.0, 10.0]


def truth_boxes(boxes, labels):
    return {"boxes": np.asarray(boxes, float).reshape(-1, 4), "labels": np.asarray(labels, int)}


def detected(boxes, labels, scores):
    out = truth_boxes(boxes, labels)
    out["scores"] = np.asarray(scores, float)
    return out


def test_detection_score_perfect_box():
    evaluator = DetectionScore()
    result = evaluate(evaluator, [truth_boxes([BOX], [1])], [detected([BOX], [1], [0.9])])
    assert evaluator.names == ("map50", "coco_map")
    assert result == {"map50": 1.0, "coco_map": 1.0}


def test_detection_score_box_with_iou_062():
    box = [0.0, 0.0, 10.0, 6.2]   # inside BOX: IoU 62 / 100
    result = evaluate(DetectionScore(), [truth_boxes([BOX], [1])], [detected([box], [1], [0.8])])
    assert result["map50"] == 1.0
    # Matches at IoU thresholds 0.50, 0.55, 0.60 only: 3 of 10, each with AP 1.
    assert result["coco_map"] == pytest.approx(3 / 10, abs=1e-12)


def test_detection_score_one_of_two_truths_found():
    truths = [truth_boxes([BOX], [1]), truth_boxes([[20.0, 20.0, 30.0, 30.0]], [1])]
    predictions = [detected([BOX], [1], [0.9]), detected(np.zeros((0, 4)), [], [])]
    result = evaluate(DetectionScore(), truths, predictions)
    # Recall 1/2 at precision 1: VOC area 0.5; COCO 101-point: recall thresholds 0.00..0.50 hit.
    assert result["map50"] == pytest.approx(0.5, abs=1e-12)
    assert result["coco_map"] == pytest.approx(51 / 101, abs=1e-12)


def test_detection_score_without_truth_boxes_is_zero():
    truths = [truth_boxes(np.zeros((0, 4)), []), truth_boxes(np.zeros((0, 4)), [])]
    predictions = [detected([BOX], [1], [0.9]), detected(np.zeros((0, 4)), [], [])]
    assert evaluate(DetectionScore(), truths, predictions) == {"map50": 0.0, "coco_map": 0.0}


def test_detection_score_reset_clears():
    evaluator = DetectionScore()
    evaluator.process(truth_boxes([BOX], [1]), detected(np.zeros((0, 4)), [], []))
    evaluator.reset()
    evaluator.process(truth_boxes([BOX], [1]), detected([BOX], [1], [0.5]))
    assert evaluator.evaluate() == {"map50": 1.0, "coco_map": 1.0}
