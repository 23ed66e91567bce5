"""Local scoring: a submission CSV against a ground-truth CSV with the competition's metric.

Both files are decoded with the same strict reader as the validator, so the score is what the
written file is worth, not what the model meant to write. Per-image scores come back as a
DataFrame; the overall score is their mean, as Kaggle averages over images. Given the test images,
each image's group (fluorescence, bright-field, stained: ``kseg.io.modality.image_group``) is
added and the score reported per group too, since a model can do well on one kind of picture and
badly on another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from kseg.core.errors import DataError
from kseg.io.modality import GROUPS, image_group
from kseg.io.sample import read_image
from kseg.metrics.scores import score_image
from kseg.submission.formats import SubmissionFormat
from kseg.submission.reading import read_targets


@dataclasses.dataclass
class Evaluation:
    score: float
    per_image: pd.DataFrame  # id, score, true_objects, predicted_objects (and group, given images)
    metric: str
    unscored: list[str] = dataclasses.field(default_factory=list)  # submission ids the solution lacks
    groups: dict[str, dict] = dataclasses.field(default_factory=dict)  # group -> {"images", "score"}


def _objects(target: np.ndarray, metric: str) -> int:
    if target.ndim == 3:
        return int(np.count_nonzero(target.reshape(-1, target.shape[-1]).any(axis=0)))
    return int(target.max(initial=0)) if metric in ("iou_map", "f2") else int(target.any())


def evaluate_submission(submission: str | Path, solution: str | Path, fmt: SubmissionFormat,
                        sizes: Mapping[str, tuple[int, int]] | None = None, metric: str | None = None,
                        images: Mapping[str, str | Path] | None = None, intensity: str = "auto") -> Evaluation:
    """Score ``submission`` against ``solution`` (the format's columns; ``Height``/``Width``
    columns are used for image sizes when present, else ``sizes``). Every solution image must have
    rows in the submission; submission images absent from the solution are ignored (Kaggle scores
    only the images in its solution file). ``images`` (id -> image file, decoded under
    ``intensity``) adds each scored image's group and the per-group scores."""
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
    groups = {}
    if images and all(i in images for i in truths):
        per_image["group"] = [image_group(read_image(images[i], intensity)) for i in per_image["id"]]
        groups = {g: {"images": int((per_image["group"] == g).sum()),
                      "score": float(per_image.loc[per_image["group"] == g, "score"].mean())}
                  for g in GROUPS if (per_image["group"] == g).any()}
    return Evaluation(float(per_image["score"].mean()), per_image, metric, unscored, groups)
