"""The Python API: the CLI's steps as functions, for notebooks (``import kseg`` re-exports them).

    import kseg
    cfg = kseg.load_config("dsb2018", overrides=["train.epochs=40"])
    run = kseg.train(cfg)                                    # a run directory, resumable
    masks = kseg.predict(run, "test_images/")                # {image stem: label image / mask / boxes}
    kseg.submit(run, output="/kaggle/working/submission.csv")

The competition loop (``make cv``, ``make tune CV=``, ``make submit CV=``)::

    folds = kseg.cross_validate(cfg)                         # every fold, OOF scores in folds.scores
    kseg.tune(folds)                                         # post-processing tuned on all OOF predictions
    kseg.submit(folds, output="submission.csv")              # the folds' ensemble, OOF-tuned

``run`` may be what :func:`train` returned, a run directory, or a list of them (an ensemble,
e.g. folds, where the family can average); :func:`tune` and :func:`submit` also take a CV folder
(or :func:`cross_validate`'s result). Messages go through ``logging``:
``kseg.set_verbosity("warning")`` keeps a notebook quiet; ``progress=False`` hides the bars.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from kseg.app.cv import CV_FILE, CvResult, submission_runs, tune_cv
from kseg.app.cv import cross_validate as _cross_validate
from kseg.app.predict import (
    PredictResult,
    collect_images,
    open_prediction,
    predict_images,
)
from kseg.app.tune import tune_postprocess
from kseg.core.config import Config
from kseg.core.config import load_config as _load_config
from kseg.core.errors import ConfigError
from kseg.engine.fit import TrainResult
from kseg.engine.fit import train as _train
from kseg.submission.make import SubmissionResult, make_submission

RunLike = TrainResult | str | os.PathLike
Runs = RunLike | Sequence[RunLike]


def cv_folder_of(run) -> Path | None:
    """The CV folder ``run`` names (a :class:`CvResult` or a folder holding ``cv.json``), else None."""
    if isinstance(run, CvResult):
        return Path(run.folder)
    if isinstance(run, (str, os.PathLike)) and (Path(run) / CV_FILE).is_file():
        return Path(run)
    return None


def runs_and_overrides(run, overrides: Sequence[str] = ()) -> tuple[list[Path], list[str]]:
    """The run directories to predict with and the overrides to apply: a CV folder gives its
    folds and its OOF-tuned post-processing (the caller's overrides win)."""
    folder = cv_folder_of(run)
    if folder is None:
        return run_dirs(run), list(overrides)
    return submission_runs(folder, overrides)


def run_dirs(run: Runs) -> list[Path]:
    """Run directories from a train result, a path, or a list of them."""
    items = [run] if isinstance(run, (TrainResult, str, os.PathLike)) else list(run)
    dirs = [Path(item.run_dir) if isinstance(item, TrainResult) else Path(item) for item in items]
    if not dirs:
        raise ConfigError("no run given")
    return dirs


def load_config(dataset: str = "demo", model: str | None = None, overrides: Iterable[str] = (),
                data_root: str | os.PathLike | None = None) -> Config:
    """A pipeline by dataset name (``kseg datasets`` lists them) or YAML path, with ``key=value``
    overrides; relative paths resolve against the working directory (or ``KSEG_HOME``)."""
    return _load_config(dataset, model=model, overrides=list(overrides),
                        data_root=None if data_root is None else str(data_root))


def train(cfg: Config, run_dir: str | os.PathLike | None = None, callbacks: Sequence = ()) -> TrainResult:
    """Train ``cfg``'s model (resuming an unfinished run of the same config); extra Keras callbacks
    run after kseg's own."""
    return _train(cfg, None if run_dir is None else Path(run_dir), extra_callbacks=list(callbacks))


def predict(run: Runs | CvResult, images, output: str | os.PathLike | None = None, *, probabilities: bool = False,
            overrides: Sequence[str] = (), progress: bool = True) -> dict | PredictResult:
    """Predict ``images`` (a folder, an image file, or a list of them) as ``make submit`` would:
    the run's TTA, tiles, resize undo and post-processing (a CV folder: its folds' ensemble with the
    OOF-tuned post-processing).

    Without ``output``: ``{image stem: prediction}``, the prediction being the instance label image,
    the mask or class-index mask, or the boxes (a dict) as the task gives. With ``output`` (a
    folder): the PNGs of ``kseg predict`` (see :mod:`kseg.app.predict`).
    """
    runs, overrides = runs_and_overrides(run, overrides)
    if output is not None:
        return predict_images(runs, images, output, probabilities=probabilities, overrides=overrides,
                              progress=progress)
    submission, _ = open_prediction(runs, overrides)
    found = {}
    for path in tqdm(collect_images(images), desc="predict", unit="img", disable=not progress, file=sys.stderr):
        found[path.stem] = submission.predict(submission.read(path))
    return found


def cross_validate(cfg: Config, *, folds: Sequence[int] | None = None, jobs: int = 1,
                   devices: Sequence[str] | None = None, progress: bool = True) -> CvResult:
    """Train every fold of ``cfg`` into one CV folder (resuming), keep and score the out-of-fold
    predictions (``result.scores``: overall, per fold and image group, Otsu alongside)."""
    return _cross_validate(cfg, folds=folds, jobs=jobs, devices=devices, progress=progress)


def submit(run: Runs | CvResult, output: str | os.PathLike | None = None, *, test_dir: str | os.PathLike | None = None,
           sample: str | os.PathLike | None = None, overrides: Sequence[str] = (),
           progress: bool = True) -> SubmissionResult:
    """Predict the test set (the config's, or ``test_dir``), write the CSV (exactly ``output`` when
    given, e.g. ``/kaggle/working/submission.csv``) and validate it; a failed validation raises.
    A CV folder submits its folds' ensemble with the OOF-tuned post-processing."""
    runs, overrides = runs_and_overrides(run, overrides)
    return make_submission(runs, overrides=overrides, test_dir=test_dir, sample=sample,
                           progress=progress, output=output)


def tune(run: RunLike | CvResult, overrides: Sequence[str] = (), progress: bool = True, **grid) -> dict:
    """Tune post-processing on the run's validation split, or on every OOF prediction of a CV
    folder (``postprocess.json`` in the run or folder)."""
    folder = cv_folder_of(run)
    if folder is not None:
        return tune_cv(folder, overrides=list(overrides), progress=progress, **grid)
    (directory,) = run_dirs(run)
    return tune_postprocess(directory, overrides=list(overrides), progress=progress, **grid)
