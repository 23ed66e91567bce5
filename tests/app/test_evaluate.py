"""Local scoring: the score read from CSVs equals the metric computed on the label images that were
written into them."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from kseg import metrics
from kseg.app.evaluate import evaluate_submission
from kseg.core.errors import DataError
from kseg.submission.formats import get_format
from kseg.submission.writing import prediction_rows, write_submission


def random_labels(rng, shape, count):
    """Up to ``count`` disjoint blobs (touching ones keep separate ids)."""
    labels = np.zeros(shape, np.int32)
    for k in range(1, count + 1):
        r, c = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
        h, w = rng.integers(3, 9, size=2)
        region = labels[r:r + h, c:c + w]
        region[region == 0] = k
    return _relabel(labels)


def _relabel(labels):
    ids = np.unique(labels)
    lookup = np.zeros(ids.max() + 1, np.int32)
    lookup[ids] = np.arange(ids.size)
    return lookup[labels]


def perturb(rng, labels):
    """Predictions of varying quality: shifted, some instances dropped, a false positive added."""
    out = np.roll(labels, rng.integers(-2, 3), axis=int(rng.integers(0, 2)))
    if out.max() > 1:
        out[out == rng.integers(1, out.max() + 1)] = 0
    out[:2, :2] = out.max() + 1
    return _relabel(out)


@pytest.fixture
def dataset():
    rng = np.random.default_rng(0)
    shapes = {"img0": (40, 50), "img1": (33, 47), "img2": (60, 31), "empty": (20, 20)}
    truths = {i: random_labels(rng, s, 6) for i, s in shapes.items()}
    truths["empty"][:] = 0
    predictions = {i: perturb(rng, t) for i, t in truths.items()}
    return shapes, truths, predictions


def write_labels(path, labels_by_id, fmt):
    rows = [row for image_id, labels in labels_by_id.items() for row in prediction_rows(image_id, labels, fmt)]
    return write_submission(path, rows, fmt)


def test_score_from_csv_equals_the_direct_metric(tmp_path, dataset):
    shapes, truths, predictions = dataset
    fmt = get_format("dsb_instances")
    solution = write_labels(tmp_path / "solution.csv", truths, fmt)
    submission = write_labels(tmp_path / "submission.csv", predictions, fmt)
    result = evaluate_submission(submission, solution, fmt, shapes)
    direct = {i: metrics.iou_map(truths[i], predictions[i]) for i in truths}
    assert 0.05 < np.mean(list(direct.values())) < 0.95, "the fixture should score in between"
    assert result.score == pytest.approx(np.mean(list(direct.values())), abs=1e-9)
    assert dict(zip(result.per_image["id"], result.per_image["score"])) == pytest.approx(direct, abs=1e-12)
    assert result.per_image.set_index("id").loc["img0", "true_objects"] == truths["img0"].max()


def test_kaggle_solution_files_carry_their_own_image_sizes(tmp_path, dataset):
    shapes, truths, predictions = dataset
    fmt = get_format("dsb_instances")
    solution = pd.read_csv(write_labels(tmp_path / "plain.csv", truths, fmt), dtype=str, keep_default_na=False)
    solution["Height"] = [shapes[i][0] for i in solution["ImageId"]]
    solution["Width"] = [shapes[i][1] for i in solution["ImageId"]]
    solution["Usage"] = "Public"
    solution.to_csv(tmp_path / "solution.csv", index=False)
    submission = write_labels(tmp_path / "submission.csv", predictions, fmt)
    result = evaluate_submission(submission, tmp_path / "solution.csv", fmt, sizes=None)
    direct = [metrics.iou_map(truths[i], predictions[i]) for i in truths]
    assert result.score == pytest.approx(np.mean(direct), abs=1e-9)


def test_a_solution_image_without_rows_is_an_error(tmp_path, dataset):
    shapes, truths, predictions = dataset
    fmt = get_format("dsb_instances")
    solution = write_labels(tmp_path / "solution.csv", truths, fmt)
    del predictions["img1"]
    submission = write_labels(tmp_path / "submission.csv", predictions, fmt)
    with pytest.raises(DataError, match="ImageId 'img1'"):
        evaluate_submission(submission, solution, fmt, shapes)


def test_submission_images_the_solution_lacks_are_named_and_not_scored(tmp_path, dataset):
    shapes, truths, predictions = dataset
    fmt = get_format("dsb_instances")
    del truths["img2"], truths["empty"]
    solution = write_labels(tmp_path / "solution.csv", truths, fmt)
    submission = write_labels(tmp_path / "submission.csv", predictions, fmt)
    result = evaluate_submission(submission, solution, fmt, shapes)
    assert sorted(result.unscored) == ["empty", "img2"]
    assert sorted(result.per_image["id"]) == ["img0", "img1"]
    expected = np.mean([metrics.iou_map(truths[i], predictions[i]) for i in ("img0", "img1")])
    assert result.score == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name, metric", [("tgs_salt", metrics.tgs_iou_map), ("carvana", metrics.dice)])
def test_per_image_formats_use_their_competition_metric(tmp_path, dataset, name, metric):
    shapes, truths, predictions = dataset
    fmt = get_format(name)
    solution = write_labels(tmp_path / "solution.csv", {i: t > 0 for i, t in truths.items()}, fmt)
    submission = write_labels(tmp_path / "submission.csv", {i: p > 0 for i, p in predictions.items()}, fmt)
    result = evaluate_submission(submission, solution, fmt, shapes)
    assert result.score == pytest.approx(np.mean([metric(truths[i] > 0, predictions[i] > 0) for i in truths]), abs=1e-9)


def test_severstal_averages_dice_over_image_class_pairs(tmp_path, dataset):
    shapes, truths, predictions = dataset
    fmt = get_format("severstal")
    to_classes = lambda labels: np.where(labels > 0, (labels - 1) % 4 + 1, 0).astype(np.uint8)  # noqa: E731
    rows = lambda labels: [r for i, t in labels.items()  # noqa: E731
                           for r in prediction_rows(i, to_classes(t), fmt, 4)]
    solution = write_submission(tmp_path / "solution.csv", rows(truths), fmt)
    submission = write_submission(tmp_path / "submission.csv", rows(predictions), fmt)
    result = evaluate_submission(submission, solution, fmt, shapes)
    pairs = [metrics.dice(to_classes(truths[i]) == k, to_classes(predictions[i]) == k)
             for i in truths for k in range(1, 5)]
    assert result.score == pytest.approx(np.mean(pairs), abs=1e-9)


def test_scores_per_image_group_given_the_images(tmp_path, dataset):
    shapes, truths, predictions = dataset
    fmt = get_format("dsb_instances")
    solution = write_labels(tmp_path / "solution.csv", truths, fmt)
    submission = write_labels(tmp_path / "submission.csv", predictions, fmt)
    # Dark background: fluorescence; light grey: bright-field; light and coloured: stained.
    pictures = {"img0": (10, 10, 10), "img1": (200, 200, 200), "img2": (230, 150, 200), "empty": (5, 5, 5)}
    files = {}
    for image_id, colour in pictures.items():
        files[image_id] = tmp_path / f"{image_id}.png"
        cv2.imwrite(str(files[image_id]), np.full((*shapes[image_id], 3), colour[::-1], np.uint8))
    result = evaluate_submission(submission, solution, fmt, shapes, images=files)
    direct = {i: metrics.iou_map(truths[i], predictions[i]) for i in truths}
    assert dict(zip(result.per_image["id"], result.per_image["group"])) == {
        "img0": "fluorescence", "img1": "brightfield", "img2": "stained", "empty": "fluorescence"}
    assert result.groups == {
        "fluorescence": {"images": 2, "score": pytest.approx((direct["img0"] + direct["empty"]) / 2, abs=1e-12)},
        "brightfield": {"images": 1, "score": pytest.approx(direct["img1"], abs=1e-12)},
        "stained": {"images": 1, "score": pytest.approx(direct["img2"], abs=1e-12)}}
    assert evaluate_submission(submission, solution, fmt, shapes).groups == {}  # no images: no groups
