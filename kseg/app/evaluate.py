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

from kseg.core.errors import DataError
from kseg.metrics.scores import score_image
from kseg.submission.formats import SubmissionFormat
from kseg.submission.reading import read_targets


@dataclasses.dataclass
class Evaluation:
    score: float
    per_image: pd.DataFrame  # id, score, true_objects, predicted_objects
    metric: str
    unscored: list[str] = dataclasses.field(default_factory=list)  # submission ids the solution lacks


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
    unscored = [i for i in predictions if i not in truths]
    return Evaluation(float(per_image["score"].mean()), per_image, metric, unscored)
