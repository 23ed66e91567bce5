"""Pseudo-labelling: the fold ensemble labels unlabelled images, and a new CV round trains on them.

``kseg pseudo --cv DIR --test-dir DIR`` (``make pseudo CV=... TEST_DIR=...``):

1. Every image of the test folder is predicted as ``kseg submit --cv`` predicts it: the folds'
   probabilities averaged (with TTA) and post-processed with the OOF-tuned settings. Only the
   images are read; whatever ground truth lies beside them is never opened.
2. A pixel is *confident* when its foreground probability is at most ``low`` (0.2) or at least
   ``high`` (0.8) (TGS Salt's winners' rule; for ``classes`` targets: its top class probability
   at least ``high``). An image is kept when at least ``min_confident`` (0.8) of its pixels are
   confident. Its pseudo-label is the post-processed prediction; its unconfident pixels get weight
   0 in the weight map, so the in-graph loss ignores them.
3. The kept images go into ``<cv>/pseudo-<digest>/`` (``kseg.io.pseudo``) and a new CV round trains
   on the real images plus them (``dataset.pseudo``): the real images keep their folds, the
   pseudo-labelled ones train in every fold and are never validated, so the new round's OOF score
   is on real labels only and compares with the first round's.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from kseg.app.cv import CvResult, cross_validate, cv_config, submission_runs
from kseg.core.errors import ConfigError, DataError
from kseg.core.fileio import atomic_path, atomic_write_text
from kseg.core.log import get_logger
from kseg.io.pseudo import MANIFEST
from kseg.io.testset import discover_test_ids
from kseg.submission.make import open_runs

log = get_logger("pseudo")

LOW, HIGH, MIN_CONFIDENT = 0.2, 0.8, 0.8


def confident_pixels(probabilities: np.ndarray, targets: str, low: float = LOW, high: float = HIGH) -> np.ndarray:
    """uint8 0/1: where the ensemble is sure (see the module notes)."""
    probabilities = np.asarray(probabilities, np.float32)
    if probabilities.ndim == 2:
        probabilities = probabilities[..., None]
    if targets == "classes":
        return (probabilities.max(axis=-1) >= high).astype(np.uint8)
    foreground = probabilities[..., 0]
    return ((foreground <= low) | (foreground >= high)).astype(np.uint8)


def pseudo_folder(cv: Path, test_dir: Path, rules: dict) -> Path:
    key = json.dumps({"test_dir": str(Path(test_dir).resolve()), **rules}, sort_keys=True)
    return Path(cv) / f"pseudo-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def pseudo_label(cv: str | Path, test_dir: str | Path, *, low: float = LOW, high: float = HIGH,
                 min_confident: float = MIN_CONFIDENT, overrides: Sequence[str] = (), progress: bool = True) -> Path:
    """Label the images of ``test_dir`` with the CV folder's fold ensemble; returns the folder of
    kept pseudo-labels (written once: a finished folder is reused)."""
    cv, test_dir = Path(cv), Path(test_dir)
    if not 0 <= low < high <= 1:
        raise ConfigError(f"pseudo-label thresholds need 0 <= low < high <= 1 (got low={low}, high={high})")
    rules = {"low": float(low), "high": float(high), "min_confident": float(min_confident)}
    out = pseudo_folder(cv, test_dir, rules)
    if (out / MANIFEST).is_file():
        log.info(f"pseudo-labels already made: {out}")
        return out
    runs, overrides = submission_runs(cv, overrides)
    cfg, fmt, _, submission = open_runs(runs, overrides)
    if fmt.rows not in ("instance", "image"):
        raise ConfigError(f"pseudo-labels are instance label images or masks; format {fmt.name} writes "
                          f"{fmt.rows} rows")
    items = discover_test_ids(test_dir, None, id_style=fmt.id_style)
    if not items:
        raise DataError("no images to pseudo-label", test_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    for image_id, path in tqdm(items, desc="pseudo-labels", unit="img", disable=not progress, file=sys.stderr):
        image = submission.read(path)
        target = submission.predict(image)
        confident = confident_pixels(submission.probabilities, cfg.generator.targets, low, high)
        share = float(confident.mean())
        entry = {"path": str(Path(path).resolve()), "confident": round(share, 6), "kept": share >= min_confident}
        if entry["kept"]:
            name = f"{hashlib.sha1(image_id.encode()).hexdigest()[:16]}.npz"
            kind = "labels" if fmt.rows == "instance" else "mask"
            target = target.astype(np.int32) if kind == "labels" else (target > 0).astype(np.uint8)
            with atomic_path(out / name, suffix=".npz") as tmp:
                np.savez_compressed(tmp, target=target, confident=confident, kind=np.array(kind))
            entry["file"] = name
        images[image_id] = entry
    kept = sum(e["kept"] for e in images.values())
    record = {"source": str(cv.resolve()), "test_dir": str(test_dir.resolve()), "rules": rules,
              "kind": "instance" if fmt.rows == "instance" else "semantic", "folds": [str(r) for r in runs],
              "images": images, "kept": kept, "dropped": len(images) - kept,
              "made": datetime.now().isoformat(timespec="seconds")}
    atomic_write_text(out / MANIFEST, json.dumps(record, indent=1))  # last: the folder is complete
    log.info(f"pseudo-labels: {kept} of {len(images)} images kept (at least {min_confident:.0%} of their pixels "
             f"below {low} or above {high}) -> {out}")
    return out


def pseudo_round(cv: str | Path, test_dir: str | Path, *, low: float = LOW, high: float = HIGH,
                 min_confident: float = MIN_CONFIDENT, overrides: Sequence[str] = (), folds=None, jobs: int = 1,
                 progress: bool = True) -> CvResult:
    """Pseudo-label ``test_dir`` with the CV folder's folds, then train a new CV round on the real
    images plus the kept pseudo-labels (resumable like ``kseg cv``); OOF scores on real labels only."""
    folder = pseudo_label(cv, test_dir, low=low, high=high, min_confident=min_confident, progress=progress)
    cfg = cv_config(Path(cv), [f"dataset.pseudo={folder}", *overrides])
    return cross_validate(cfg, folds=folds, jobs=jobs, progress=progress)
