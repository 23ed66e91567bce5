"""Evaluators: one interface for scoring a set of images, shared by the training callbacks, the
final validation score, the classical baselines, ``tune`` and ``evaluate``.

As detectron2's ``DatasetEvaluator``: ``reset()``, then ``process(truth, prediction)`` once per
image, then ``evaluate()`` -> ``{name: value}``. The first name is the one a run monitors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np

from kseg.metrics import detection as detection_metrics


class Evaluator(Protocol):
    names: tuple[str, ...]  # what ``evaluate`` returns; the first is the monitored score

    def reset(self) -> None: ...

    def process(self, truth: Any, prediction: Any) -> None: ...

    def evaluate(self) -> dict[str, float]: ...


class MeanScore:
    """The mean over images of ``score(truth, prediction)`` (how Kaggle averages image scores)."""

    def __init__(self, score: Callable[[Any, Any], float], name: str):
        self.score = score
        self.names = (name,)
        self.scores: list[float] = []

    def reset(self) -> None:
        self.scores = []

    def process(self, truth, prediction) -> None:
        self.scores.append(self.score(truth, prediction))

    def evaluate(self) -> dict[str, float]:
        return {self.names[0]: float(np.mean(self.scores))}


class DetectionScore:
    """VOC mAP@0.5 (monitored) and COCO mAP@[.5:.95] of box detections against truth boxes
    (the per-image dicts of :mod:`kseg.metrics.detection`)."""

    names = ("map50", "coco_map")

    def __init__(self):
        self.detections: list[dict] = []
        self.truths: list[dict] = []

    def reset(self) -> None:
        self.detections, self.truths = [], []

    def process(self, truth: dict, prediction: dict) -> None:
        self.truths.append(truth)
        self.detections.append(prediction)

    def evaluate(self) -> dict[str, float]:
        return detection_metrics.score_detections(self.detections, self.truths)


def evaluate(evaluator: Evaluator, truths: Iterable, predictions: Iterable) -> dict[str, float]:
    """Run ``evaluator`` over matching truths and predictions."""
    evaluator.reset()
    for truth, prediction in zip(truths, predictions, strict=True):
        evaluator.process(truth, prediction)
    return evaluator.evaluate()
