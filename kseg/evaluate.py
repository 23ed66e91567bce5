"""Local scoring: a submission CSV against a ground-truth CSV with the competition's metric.

Both files are decoded with the same strict reader as the validator, so the score is what the
written file is worth, not what the model meant to write. Per-image scores come back as a
DataFrame; the overall score is their mean, as Kaggle averages over images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from kseg import metrics
from kseg.errors import DataError
from kseg.submit import SubmissionFormat, read_targets

METRICS = ("iou_map", "f2", "tgs_iou_map", "dice")


def score_image(truth: np.ndarray, prediction: np.ndarray, metric: str) -> float:
    """One image's score. Instance metrics take label images; mask metrics use nonzero pixels;
    H x W x K stacks (one mask per class) score the mean over classes (Severstal's Dice)."""
    if metric not in METRICS:
        raise DataError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if truth.ndim == 3 or prediction.ndim == 3:
        truth, prediction = _same_depth(truth, prediction)
        return float(np.mean([score_image(truth[..., k], prediction[..., k], metric)
                              for k in range(truth.shape[-1])]))
    if metric == "iou_map":
        return metrics.iou_map(truth, prediction)
    if metric == "f2":
        return metrics.airbus_f2(truth, prediction)
    if metric == "tgs_iou_map":
        return metrics.tgs_iou_map(truth, prediction)
    return metrics.dice(truth, prediction)


def _same_depth(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class stacks of equal depth (a class that one side never mentions is an empty mask)."""
    a = a if a.ndim == 3 else a[..., None]
    b = b if b.ndim == 3 else b[..., None]
    depth = max(a.shape[-1], b.shape[-1])
    pad = lambda x: np.concatenate([x, np.zeros((*x.shape[:2], depth - x.shape[-1]), x.dtype)], axis=-1)  # noqa: E731
    return pad(a), pad(b)


@dataclasses.dataclass
class Evaluation:
    score: float
    per_image: pd.DataFrame  # id, score, true_objects, predicted_objects
    metric: str


def _objects(target: np.ndarray, metric: str) -> int:
    if target.ndim == 3:
        return int(np.count_nonzero(target.reshape(-1, target.shape[-1]).any(axis=0)))
    return int(target.max(initial=0)) if metric in ("iou_map", "f2") else int(target.any())


def evaluate_submission(submission: str | Path, solution: str | Path, fmt: SubmissionFormat,
                        sizes: Mapping[str, tuple[int, int]] | None = None, metric: str | None = None) -> Evaluation:
    """Score ``submission`` against ``solution`` (the format's columns; ``Height``/``Width``
    columns are used for image sizes when present, else ``sizes``). Every solution image must have
    rows in the submission; submission images absent from the solution are ignored (Kaggle scores
    only the images in its solution file)."""
    metric = metric or fmt.metric
    truths = read_targets(solution, fmt, sizes, strict_header=False)
    if not truths:
        raise DataError("solution file has no rows", solution)
    truth_sizes = {image_id: target.shape[:2] for image_id, target in truths.items()}
    predictions = read_targets(submission, fmt, {**truth_sizes, **(sizes or {})}, strict_header=True)
    missing = [i for i in truths if i not in predictions]
    if missing:
        raise DataError(f"{len(missing)} image(s) of the solution have no row in the submission, e.g. "
                        f"{fmt.id_column} {missing[0]!r}", submission)
    records = []
    for image_id, truth in truths.items():
        prediction = predictions[image_id]
        if prediction.shape[:2] != truth.shape[:2]:
            raise DataError(f"{fmt.id_column} {image_id!r}: submission decodes at {prediction.shape[:2]}, the "
                            f"solution at {truth.shape[:2]}", submission)
        records.append({"id": image_id, "score": score_image(truth, prediction, metric),
                        "true_objects": _objects(truth, metric), "predicted_objects": _objects(prediction, metric)})
    per_image = pd.DataFrame.from_records(records)
    return Evaluation(float(per_image["score"].mean()), per_image, metric)
