"""The Python API: the CLI's steps as functions, for notebooks (``import kseg`` re-exports them).

    import kseg
    cfg = kseg.load_config("dsb2018", overrides=["train.epochs=40"])
    run = kseg.train(cfg)                                    # a run directory, resumable
    masks = kseg.predict(run, "test_images/")                # {image stem: label image / mask / boxes}
    kseg.submit(run, output="/kaggle/working/submission.csv")

``run`` may be what :func:`train` returned, a run directory, or a list of them (an ensemble,
e.g. folds, where the family can average). Messages go through ``logging``:
``kseg.set_verbosity("warning")`` keeps a notebook quiet; ``progress=False`` hides the bars.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

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


def predict(run: Runs, images, output: str | os.PathLike | None = None, *, probabilities: bool = False,
            overrides: Sequence[str] = (), progress: bool = True) -> dict | PredictResult:
    """Predict ``images`` (a folder, an image file, or a list of them) as ``make submit`` would:
    the run's TTA, tiles, resize undo and post-processing.

    Without ``output``: ``{image stem: prediction}``, the prediction being the instance label image,
    the mask or class-index mask, or the boxes (a dict) as the task gives. With ``output`` (a
    folder): the PNGs of ``kseg predict`` (see :mod:`kseg.app.predict`).
    """
    if output is not None:
        return predict_images(run_dirs(run), images, output, probabilities=probabilities, overrides=overrides,
                              progress=progress)
    submission, _ = open_prediction(run_dirs(run), overrides)
    found = {}
    for path in tqdm(collect_images(images), desc="predict", unit="img", disable=not progress, file=sys.stderr):
        found[path.stem] = submission.predict(submission.read(path))
    return found


def submit(run: Runs, output: str | os.PathLike | None = None, *, test_dir: str | os.PathLike | None = None,
           sample: str | os.PathLike | None = None, overrides: Sequence[str] = (),
           progress: bool = True) -> SubmissionResult:
    """Predict the test set (the config's, or ``test_dir``), write the CSV (exactly ``output`` when
    given, e.g. ``/kaggle/working/submission.csv``) and validate it; a failed validation raises."""
    return make_submission(run_dirs(run), overrides=list(overrides), test_dir=test_dir, sample=sample,
                           progress=progress, output=output)


def tune(run: RunLike, overrides: Sequence[str] = (), progress: bool = True, **grid) -> dict:
    """Tune post-processing on the run's validation split (``postprocess.json`` in the run)."""
    (directory,) = run_dirs(run)
    return tune_postprocess(directory, overrides=list(overrides), progress=progress, **grid)
