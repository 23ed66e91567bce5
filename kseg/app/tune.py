"""Tune post-processing (threshold, minimum object size, marker threshold, the classification
head's empty-image gate) on a run's validation
split and save the best values beside the checkpoint as ``postprocess.json``.

The split is the one training held out (same cache, strata and ``kfold_split`` arguments from the
run's config), and predictions go through the same path as ``make submit``: original-size images,
the run's TTA and tiling, probabilities mapped back to the original size, then the submission
format's post-processing and metric. The config's own values are always a candidate, so the saved
values never score below them on this split.
"""

from __future__ import annotations

import functools
import itertools
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from kseg.core import runs
from kseg.core.errors import ConfigError
from kseg.core.fileio import atomic_write_text
from kseg.core.runs import run_config
from kseg.data.pipeline import preprocess_train, train_reader
from kseg.data.split import dataset_split
from kseg.io.modality import GROUPS, decoded_group
from kseg.metrics.evaluators import MeanScore, evaluate
from kseg.metrics.scores import score_image
from kseg.submission.formats import get_format
from kseg.tasks.base import load_members, task_class
from kseg.tasks.semantic.postprocess import (
    POSTPROCESS_KEYS,
    probabilities_to_target,
    split_image_probability,
)
from kseg.tasks.semantic.predictor import Predictor

TUNED_NAME = runs.TUNED
DEFAULT_THRESHOLDS = tuple(np.round(np.arange(0.30, 0.701, 0.05), 2).tolist())
DEFAULT_MIN_SIZES = (0, 4, 8, 16, 32, 64, 128)
DEFAULT_EMPTY_THRESHOLDS = tuple(np.round(np.arange(0.1, 0.91, 0.1), 1).tolist())
INSTANCE_METHODS = ("components", "distance", "markers")


def validation_split(cfg) -> tuple[object, list[str]]:
    """(training reader, validation ids) exactly as the run's training split them."""
    _, valid_ids = dataset_split(cfg, preprocess_train(cfg))
    return train_reader(cfg), valid_ids


def _grid(base: dict, method: str, thresholds: Sequence[float], min_sizes: Sequence[int]) -> list[dict]:
    return [{**base, "method": method, "threshold": float(threshold), "min_size": int(min_size)}
            for threshold, min_size in itertools.product(thresholds, min_sizes)]


def tune_postprocess(run_dir: str | Path, overrides: Sequence[str] = (), thresholds: Sequence[float] | None = None,
                     min_sizes: Sequence[int] | None = None, marker_thresholds: Sequence[float] | None = None,
                     methods: Sequence[str] | None = None, limit: int | None = None,
                     empty_thresholds: Sequence[float] | None = None, progress: bool = True) -> dict:
    """Grid-search post-processing (:func:`search_postprocess`) on the run's validation split; write
    and return ``postprocess.json``."""
    run_dir = Path(run_dir)
    run_cfg = run_config(run_dir, overrides)
    model_name = run_cfg.model.name
    task = task_class(model_name)
    if task.kind != "semantic":
        raise ConfigError(task.tuning_hint.format(run=run_dir.name, model=model_name))
    members = load_members(run_dir, overrides=overrides, checkpoint=str(run_cfg.predict.checkpoint))
    cfg = members[0].cfg
    reader, valid_ids = validation_split(cfg)
    if limit:
        valid_ids = valid_ids[:int(limit)]
    if not valid_ids:
        raise ConfigError("the validation split is empty; nothing to tune on")
    predictor = Predictor(members)
    cases, groups = [], []
    for sample_id in tqdm(valid_ids, desc="validation predictions", unit="img", disable=not progress, file=sys.stderr):
        sample = reader.load(sample_id)
        cases.append((sample.target, predictor.predict(sample.image)))
        groups.append(decoded_group(sample.image, sample.integrity))
    found = search_postprocess(cases, cfg, thresholds=thresholds, min_sizes=min_sizes,
                               marker_thresholds=marker_thresholds, methods=methods,
                               empty_thresholds=empty_thresholds, progress=progress)
    record = {
        **found,
        "groups": group_scores(cases, groups, found["params"], cfg),
        "images": len(valid_ids),
        "split": {"n_folds": cfg.split.n_folds, "fold": cfg.split.fold, "seed": cfg.split.seed},
        "checkpoint": members[0].checkpoint if len(members) == 1 else "cycles",
        "tta": list(predictor.tta),
        "tuned": datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_text(run_dir / TUNED_NAME, json.dumps(record, indent=1))
    return record


def search_postprocess(cases: Sequence[tuple[np.ndarray, np.ndarray]], cfg, *, thresholds=None, min_sizes=None,
                       marker_thresholds=None, methods=None, empty_thresholds=None, progress: bool = True) -> dict:
    """The best post-processing for ``cases`` (truth, probabilities) under ``cfg``'s format and
    targets: ``params``, ``score``, ``config_score`` (the config's own values), the best of each
    method, the best empty-image gate (``gate``, when the model has a classification head) and every
    setting tried (``grid``).

    For each method (default: every instance-separation method the model's channels allow),
    threshold x min_size are searched jointly; for ``markers`` the marker threshold is then searched
    with the best pair fixed. With a classification head's channel, ``empty_threshold`` is then
    searched with the best pixel settings fixed. The config's values are tried first and ties keep
    the earlier setting.
    """
    fmt = get_format(cfg.submission.format)
    targets_spec = cfg.generator.targets
    evaluator = MeanScore(functools.partial(score_image, metric=fmt.metric), fmt.metric)

    def mean_score(params: dict) -> float:
        predictions = [probabilities_to_target(probs, fmt, params, targets_spec) for _, probs in cases]
        return evaluate(evaluator, [truth for truth, _ in cases], predictions)[fmt.metric]

    base = {k: cfg.postprocess[k] for k in POSTPROCESS_KEYS if k in cfg.postprocess}
    configured = base.get("method", "components")
    instance_output = fmt.rows == "instance" and targets_spec != "classes"
    if not instance_output:
        methods = [configured]
    elif methods is None:
        # Every method that the model's channels support, so the user sees which separation wins.
        methods = INSTANCE_METHODS if targets_spec in ("mask+border", "mask+center") else ("components", "distance")
    thresholds, min_sizes = thresholds or DEFAULT_THRESHOLDS, min_sizes or DEFAULT_MIN_SIZES
    scores: list[dict] = []

    def search(grid) -> tuple[dict, float]:
        best, best_score = None, -np.inf
        for params in grid:
            score = mean_score(params)
            scores.append({**params, "score": score})
            if score > best_score:  # strictly better: ties keep the earlier setting
                best, best_score = params, score
        return best, best_score

    gated = any(split_image_probability(probs, targets_spec)[1] is not None for _, probs in cases)
    empty_thresholds = (empty_thresholds or DEFAULT_EMPTY_THRESHOLDS) if gated else ()
    total = 1 + len(methods) * len(thresholds) * len(min_sizes) + len(empty_thresholds)
    bar = tqdm(total=total, desc="post-processing grid", unit="setting", disable=not progress, file=sys.stderr)
    best, best_score = search([dict(base)])
    config_score = best_score
    bar.update()
    per_method = {}
    for method in methods:
        grid = _grid(base, method, thresholds, min_sizes)
        method_best, method_score = search(grid)
        bar.update(len(grid))
        if method == "markers":  # marker threshold searched with the best threshold / size fixed
            markers = [{**method_best, "marker_threshold": float(m)} for m in marker_thresholds or DEFAULT_THRESHOLDS]
            marker_best, marker_score = search(markers)
            if marker_score > method_score:
                method_best, method_score = marker_best, marker_score
        per_method[method] = {"params": method_best, "score": method_score}
        if method_score > best_score:
            best, best_score = method_best, method_score
    gate = None
    if empty_thresholds:  # images the head calls empty are emptied: the pixel settings stay fixed
        gate_best, gate_score = search([{**best, "empty_threshold": float(t)} for t in empty_thresholds])
        bar.update(len(empty_thresholds))
        gate = {"params": gate_best, "score": gate_score, "ungated_score": best_score}
        if gate_score > best_score:
            best, best_score = gate_best, gate_score
    bar.close()
    return {"params": best, "score": best_score, "config_score": config_score, "methods": per_method,
            "gate": gate, "metric": fmt.metric, "format": fmt.name, "grid": scores}


def group_scores(cases: Sequence[tuple[np.ndarray, np.ndarray]], groups: Sequence[str], params: dict,
                 cfg) -> dict[str, dict]:
    """The mean score of ``params`` per image group (``kseg.io.modality.decoded_group``)."""
    fmt = get_format(cfg.submission.format)
    scores = [score_image(truth, probabilities_to_target(probs, fmt, params, cfg.generator.targets), fmt.metric)
              for truth, probs in cases]
    return {group: {"images": sum(g == group for g in groups),
                    "score": float(np.mean([s for s, g in zip(scores, groups) if g == group]))}
            for group in GROUPS if group in groups}
