"""Cross-validation: every fold trained, its held-out predictions kept, scored, tuned and ensembled.

``kseg cv`` trains all ``split.n_folds`` folds of a config into one CV folder, named by the
config's fingerprint (the fold number left out), so running it again resumes: a finished fold is
not retrained, an interrupted one resumes from its last snapshot, a fold that a live process trains
is refused. After each fold, its held-out images are predicted by that fold's *last* checkpoint
(the best one was picked on those very images; with ``train.average_checkpoints`` from the last k
epochs, their average) exactly as ``kseg submit`` predicts (original
size, the run's TTA) and saved once as out-of-fold (OOF) probabilities. Every training image is
held out by exactly one fold, so the OOF predictions cover the training set once, each by a model
that never trained on it.

The CV folder::

    <runs_dir>/<dataset>-<model>-cv-<fingerprint>/
      cv.json              dataset, model, folds, fingerprint; the folds finished so far
      config.yaml          the resolved config (split.fold is each fold's own)
      fold-<k>/            fold k's run directory (checkpoints, history.csv, TensorBoard logs)
      oof/fold-<k>.npz     fold k's held-out images: ids and uint8 probabilities (p x 255, rounded)
      oof.json             OOF score overall, per fold and per image group, Otsu on the same images
      curves.png           each fold's validation curve
      postprocess.json     ``kseg tune --cv``: post-processing tuned on every OOF prediction

``kseg submit --cv DIR`` averages the folds' probabilities (with TTA) and applies the OOF-tuned
post-processing. Folds run one after another in this process, or as ``jobs`` joblib processes
(with ``devices``, each job sees one GPU).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from tqdm.auto import tqdm

from kseg.app.tune import search_postprocess, validation_split
from kseg.core import runs
from kseg.core.config import Config, apply_overrides, project_path
from kseg.core.errors import ConfigError, DataError
from kseg.core.fileio import atomic_path, atomic_write_text
from kseg.core.log import get_logger
from kseg.core.pictures import unit_to_uint8, write_png
from kseg.data.masks import otsu_baseline
from kseg.data.pipeline import train_reader
from kseg.engine.fit import train
from kseg.io.modality import GROUPS, decoded_group
from kseg.metrics.scores import score_image
from kseg.submission.formats import get_format
from kseg.tasks.base import load_members, task_class
from kseg.tasks.semantic.postprocess import (
    POSTPROCESS_KEYS,
    probabilities_to_target,
    resolve_postprocess,
)
from kseg.tasks.semantic.predictor import Predictor

log = get_logger("cv")

CV_FILE = "cv.json"
OOF_DIR = "oof"
OOF_SCORES = "oof.json"
CURVES = "curves.png"
OOF_CHECKPOINT = "last"


def oof_checkpoint(cfg: Config) -> str:
    """The checkpoint whose held-out predictions are the OOF ones: the last epoch's, the ensemble of
    the cosine-restart cycles' snapshots (``predict.checkpoint: cycles``), or the average of the last
    k epochs (``train.average_checkpoints`` with ``average_from: last``). Never one chosen by its
    score on the held-out images (``best``), which would flatter the OOF score."""
    t = cfg.train
    if cfg.predict.get("checkpoint") == "cycles":
        return "cycles"
    if int(t.get("average_checkpoints", 0) or 0) and t.get("average_from", "last") == "last":
        return "averaged"
    return OOF_CHECKPOINT


@dataclasses.dataclass
class CvResult:
    folder: Path
    scores: dict
    trained: list[int]  # folds trained (or resumed) by this call


def fold_dir(folder: Path, fold: int) -> Path:
    return Path(folder) / f"fold-{fold}"


def oof_path(folder: Path, fold: int) -> Path:
    return Path(folder) / OOF_DIR / f"fold-{fold}.npz"


def with_fold(cfg: Config, fold: int) -> Config:
    return Config(apply_overrides(cfg.to_dict(), [f"split.fold={int(fold)}"]))


def cv_folder(cfg: Config) -> Path:
    """The CV folder of ``cfg``: the same for every fold number, new for any other training setting."""
    fingerprint = runs.training_fingerprint(with_fold(cfg, 0))[:12]
    return project_path(cfg.train.runs_dir) / f"{cfg.dataset.name}-{cfg.model.name}-cv-{fingerprint}"


def _check_semantic(cfg: Config) -> None:
    task = task_class(cfg.model.name)
    if task.kind != "semantic":
        raise ConfigError(f"kseg cv keeps out-of-fold probabilities of segmentation models; {cfg.model.name} is a "
                          f"{task.kind} model: train its folds with `make train FOLD=k`")


# -- training ---------------------------------------------------------------------------------------
def cross_validate(cfg: Config, *, folds: Sequence[int] | None = None, jobs: int = 1,
                   devices: Sequence[str] | None = None, progress: bool = True) -> CvResult:
    """Train every fold not finished yet, write the missing OOF files, score the OOF predictions."""
    _check_semantic(cfg)
    n_folds = int(cfg.split.n_folds)
    folds = list(range(n_folds)) if folds is None else sorted({int(f) for f in folds})
    if any(not 0 <= f < n_folds for f in folds):
        raise ConfigError(f"folds {folds} are not all in 0..{n_folds - 1} (split.n_folds={n_folds})")
    folder = cv_folder(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = runs.training_fingerprint(with_fold(cfg, 0))
    record = _read_record(folder)
    if record and record.get("fingerprint") != fingerprint:
        raise DataError("CV folder holds another config's folds (fingerprint differs)", folder)
    if not (folder / runs.CONFIG).is_file():
        with atomic_path(folder / runs.CONFIG) as tmp:
            with_fold(cfg, 0).dump(tmp)
    _write_record(folder, cfg, fingerprint)
    pending = [f for f in folds if runs.run_state(fold_dir(folder, f)) != "finished"
               or not oof_path(folder, f).is_file()]
    settings = cfg.to_dict()
    if pending:
        log.info(f"cross-validation in {folder}: folds {pending} to do of {folds}")
    if jobs > 1 or devices:
        devices = list(devices or [])
        count = len(devices) or int(jobs)
        Parallel(n_jobs=count, backend="loky")(
            delayed(train_fold)(settings, fold, folder, devices[i % len(devices)] if devices else None, False)
            for i, fold in enumerate(pending))
    else:
        for fold in pending:
            train_fold(settings, fold, folder, None, progress)
    _write_record(folder, cfg, fingerprint)
    scores = score_oof(folder)
    write_curves(folder)
    return CvResult(folder, scores, pending)


def train_fold(settings: dict, fold: int, folder: Path, device: str | None = None, progress: bool = True) -> None:
    """Train (or resume) fold ``fold`` in its run directory and write its OOF file. A job of its own
    when folds run in parallel; ``device`` is then the one GPU it sees."""
    if device is not None:
        # TensorFlow and JAX pick their GPUs when first used, which is later than this.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device)
    cfg = with_fold(Config(settings), fold)
    run = fold_dir(folder, fold)
    if runs.run_state(run) != "finished":
        keras.backend.clear_session()
        log.info(f"fold {fold}: training in {run}")
        train(cfg, run_dir=run)
    if not oof_path(folder, fold).is_file():
        write_oof(run, oof_path(folder, fold), progress=progress)
    _write_record(folder, cfg, runs.training_fingerprint(with_fold(cfg, 0)))  # folds_done as each fold ends


def write_oof(run: Path, path: Path, progress: bool = True) -> Path:
    """The run's held-out images predicted by its last checkpoint, as ``submit`` predicts them,
    saved compressed: ``ids`` and one uint8 array per image (``p0``, ``p1``, ...)."""
    members = load_members(run, checkpoint=oof_checkpoint(runs.run_config(run)))
    reader, valid_ids = validation_split(members[0].cfg)
    predictor = Predictor(members)
    arrays = {"ids": np.array(valid_ids)}
    for i, sample_id in enumerate(tqdm(valid_ids, desc=f"OOF {run.name}", unit="img", disable=not progress,
                                       file=sys.stderr)):
        arrays[f"p{i}"] = unit_to_uint8(predictor.predict(reader.load(sample_id).image))  # 1/510 at most off
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    return path


def read_oof(path: Path) -> dict[str, np.ndarray]:
    """``{image id: float32 probabilities}`` of one OOF file."""
    with np.load(path) as data:
        ids = [str(i) for i in data["ids"]]
        return {sample_id: data[f"p{i}"].astype(np.float32) / np.float32(255) for i, sample_id in enumerate(ids)}


def _read_record(folder: Path) -> dict:
    path = folder / CV_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_record(folder: Path, cfg: Config, fingerprint: str) -> None:
    n_folds = int(cfg.split.n_folds)
    done = [f for f in range(n_folds) if runs.run_state(fold_dir(folder, f)) == "finished"
            and oof_path(folder, f).is_file()]
    record = {"dataset": cfg.dataset.name, "model": cfg.model.name, "n_folds": n_folds,
              "split_seed": int(cfg.split.seed), "fingerprint": fingerprint, "folds_done": done,
              "oof_checkpoint": oof_checkpoint(cfg), "updated": datetime.now().isoformat(timespec="seconds")}
    atomic_write_text(folder / CV_FILE, json.dumps(record, indent=1))


def cv_config(folder: Path, overrides: Sequence[str] = ()) -> Config:
    return runs.run_config(folder, overrides)


def finished_folds(folder: Path) -> list[int]:
    """Folds of the CV folder with a finished run and an OOF file."""
    record = _read_record(Path(folder))
    if not record:
        raise DataError("not a CV folder (no cv.json); make one with `make cv`", Path(folder))
    return list(record["folds_done"])


# -- scoring --------------------------------------------------------------------------------------
def oof_cases(folder: Path, overrides: Sequence[str] = ()):
    """``(config, [(id, fold, image, truth, probabilities, group)])`` of every finished fold's OOF
    images (the OOF files name their images; every fold reads the same training set)."""
    folder = Path(folder)
    cfg = cv_config(folder, overrides)
    reader = train_reader(cfg)
    cases = []
    for fold in finished_folds(folder):
        for sample_id, probabilities in read_oof(oof_path(folder, fold)).items():
            sample = reader.load(sample_id)
            cases.append((sample_id, fold, sample.image, sample.target, probabilities,
                          decoded_group(sample.image, sample.integrity)))
    if not cases:
        raise DataError("no finished fold yet: nothing to score", folder)
    return cfg, cases


def score_oof(folder: Path, overrides: Sequence[str] = (), params: dict | None = None, *, read=None) -> dict:
    """OOF score overall, per fold and per image group, with Otsu on the same images; saved as
    ``oof.json``. ``params`` default to the config's post-processing with the folder's OOF-tuned
    values; ``read`` is :func:`oof_cases`' result when the caller has it already."""
    folder = Path(folder)
    cfg, cases = read or oof_cases(folder, overrides)
    fmt = get_format(cfg.submission.format)
    params = resolve_postprocess(folder, cfg) if params is None else params
    min_size = int(params.get("min_size", cfg.postprocess.min_size))
    rows = []
    for sample_id, fold, image, truth, probabilities, group in cases:
        prediction = probabilities_to_target(probabilities, fmt, params, cfg.generator.targets)
        otsu = otsu_baseline(image, min_size=min_size)
        otsu = otsu if fmt.rows == "instance" else (otsu > 0).astype(np.uint8)
        rows.append({"id": sample_id, "fold": fold, "group": group,
                     "score": float(score_image(truth, prediction, fmt.metric)),
                     "otsu": float(score_image(truth, otsu, fmt.metric))})

    def summary(selected: list[dict]) -> dict:
        return {"images": len(selected), "score": float(np.mean([r["score"] for r in selected])),
                "otsu": float(np.mean([r["otsu"] for r in selected]))}

    scores = {"metric": fmt.metric, "postprocess": params, "checkpoint": oof_checkpoint(cfg), **summary(rows),
              "folds": {str(f): summary([r for r in rows if r["fold"] == f]) for f in sorted({r["fold"] for r in rows})},
              "groups": {g: summary([r for r in rows if r["group"] == g]) for g in GROUPS
                         if any(r["group"] == g for r in rows)},
              "per_image": rows}
    atomic_write_text(folder / OOF_SCORES, json.dumps(scores, indent=1))
    return scores


def write_curves(folder: Path, size: tuple[int, int] = (360, 640)) -> Path | None:
    """A PNG of each finished or running fold's validation monitor per epoch (one line per fold)."""
    folder = Path(folder)
    curves = {}
    for run in sorted(folder.glob("fold-*")):
        history = run / runs.HISTORY
        if not history.is_file():
            continue
        table = pd.read_csv(history)
        monitor = next((c for c in table.columns if c.startswith("val_") and c != "val_loss"), None)
        if monitor is not None and len(table):
            curves[run.name] = (monitor, table["epoch"].to_numpy(), table[monitor].to_numpy(float))
    if not curves:
        return None
    height, width = size
    canvas = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 50, 120, 20, 30
    epochs = max(float(e.max()) for _, e, _ in curves.values()) or 1.0
    values = np.concatenate([v for _, _, v in curves.values()])
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    high = high if high > low else low + 1.0
    cv2.rectangle(canvas, (left, top), (width - right, height - bottom), (0, 0, 0), 1)
    for value in (low, high):
        y = int(top + (high - value) / (high - low) * (height - top - bottom))
        cv2.putText(canvas, f"{value:.3f}", (2, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    for k, (name, (monitor, epoch, value)) in enumerate(curves.items()):
        xs = left + epoch / epochs * (width - left - right)
        ys = top + (high - value) / (high - low) * (height - top - bottom)
        points = np.stack([xs, ys], axis=1)[np.isfinite(ys)].round().astype(np.int32)
        colour = palette[k % len(palette)]
        cv2.polylines(canvas, [points.reshape(-1, 1, 2)], False, colour, 2)
        cv2.putText(canvas, name, (width - right + 8, top + 16 * (k + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1)
    cv2.putText(canvas, f"{next(iter(curves.values()))[0]} per epoch", (left, height - 8),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    return write_png(folder / CURVES, canvas)


# -- tuning and submitting ---------------------------------------------------------------------------
def tune_cv(folder: Path, overrides: Sequence[str] = (), progress: bool = True, **grid) -> dict:
    """Post-processing tuned on every OOF prediction; saved as the CV folder's ``postprocess.json``
    and used by ``score_oof`` and ``submit --cv``."""
    folder = Path(folder)
    read = cfg, cases = oof_cases(folder, overrides)
    found = search_postprocess([(truth, probs) for _, _, _, truth, probs, _ in cases], cfg, progress=progress, **grid)
    record = {**found, "images": len(cases), "folds": finished_folds(folder), "checkpoint": oof_checkpoint(cfg),
              "oof": True, "tuned": datetime.now().isoformat(timespec="seconds")}
    atomic_write_text(folder / runs.TUNED, json.dumps(record, indent=1))
    score_oof(folder, overrides, read=read)
    return record


def submission_runs(folder: Path, overrides: Sequence[str] = ()) -> tuple[list[Path], list[str]]:
    """The fold runs to ensemble and the ``postprocess.*`` overrides of the CV folder's tuning,
    followed by the caller's ``overrides`` (which win)."""
    folder = Path(folder)
    folds = finished_folds(folder)
    if not folds:
        raise DataError("no finished fold to submit from", folder)
    params = runs.tuned_postprocess(folder)
    tuned = [f"postprocess.{k}={json.dumps(v)}" for k, v in params.items() if k in POSTPROCESS_KEYS]
    return [fold_dir(folder, f) for f in folds], [*tuned, *overrides]
