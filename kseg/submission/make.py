"""``make submit``: the one submission loop, for every family.

run(s) -> the run's task -> its ``Submission`` (what reads, predicts and draws a test image)
-> for each test image: target -> the format's rows -> write the CSV (atomically) -> contact sheet
of outlines or boxes -> validate the CSV as the scorer would read it (non-zero exit on failure).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from kseg.core.config import project_path
from kseg.core.errors import ConfigError, DataError
from kseg.core.log import get_logger
from kseg.core.pictures import contact_sheet, outline_panel, write_png
from kseg.core.runs import in_use, run_config, run_state
from kseg.io.sample import check_image
from kseg.io.testset import discover_test_ids
from kseg.submission.cache import PredictionCache
from kseg.submission.formats import FORMATS, SubmissionFormat, get_format
from kseg.submission.validation import ValidationReport, validate_submission
from kseg.submission.writing import (
    box_rows,
    prediction_rows,
    submission_path,
    write_submission,
)
from kseg.tasks.base import get_task, load_members

log = get_logger("submission")


@dataclasses.dataclass
class SubmissionResult:
    csv: Path
    sheet: Path | None
    report: ValidationReport
    postprocess: dict
    runs: list[Path]
    skipped: list[str] = dataclasses.field(default_factory=list)  # unreadable test images (submission.on_error)


CACHE_FOLDER = ".kseg-predictions"
CACHE_SECTIONS = ("preprocess", "predict", "submission", "generator", "model")
ON_ERROR = ("raise", "skip")


def nothing(fmt: SubmissionFormat):
    """The target of an image predicted as holding nothing (a skipped, unreadable test image)."""
    if fmt.boxes:
        return {"boxes": np.zeros((0, 4)), "scores": np.zeros(0)}
    return np.zeros((1, 1), np.int32 if fmt.rows == "instance" else np.uint8)


def unreadable_images(items, on_error: str) -> dict[str, str]:
    """Every test image that cannot be read, checked before anything is predicted: an error listing
    them all (``submission.on_error: raise``), or the list to skip (``skip``)."""
    if on_error not in ON_ERROR:
        raise ConfigError(f"submission.on_error must be one of {', '.join(ON_ERROR)}, not {on_error!r}")
    bad = {image_id: problem for image_id, path in items if (problem := check_image(path)) is not None}
    listing = "\n  ".join(f"{path}: {bad[image_id]}" for image_id, path in items if image_id in bad)
    if bad and on_error == "raise":
        raise DataError(f"{len(bad)} test image(s) cannot be read (submission.on_error: skip predicts nothing for "
                        f"them and still writes the CSV):\n  {listing}")
    if bad:
        log.warning(f"warning: {len(bad)} test image(s) cannot be read; predicted as empty:\n  {listing}")
    return bad


def target_rows(image_id: str, target, fmt: SubmissionFormat, num_classes: int | None) -> list[tuple]:
    """The CSV rows of one image's target: boxes (box formats) or a label image / mask."""
    if fmt.boxes:
        return box_rows(image_id, target["boxes"], target["scores"])
    return prediction_rows(image_id, target, fmt, num_classes or 1)


def test_items(cfg, fmt: SubmissionFormat, test_dir=None, sample=None) -> tuple[list[tuple[str, Path]], Path | None]:
    """``(id, image path)`` of the test images and the sample submission that lists them (if any)."""
    root = project_path(cfg.dataset.root) if cfg.dataset.root else None
    if test_dir is None:
        if root is None or not cfg.dataset.test:
            raise ConfigError(f"dataset {cfg.dataset.name!r} names no test folder: pass TEST_DIR=folder "
                              "(--test-dir)")
        test_dir = root / cfg.dataset.test
        if sample is None and cfg.dataset.sample_submission:
            sample = root / cfg.dataset.sample_submission
    if sample is not None and not Path(sample).is_file():
        raise DataError("sample submission does not exist", sample)
    return discover_test_ids(Path(test_dir), sample, id_style=fmt.id_style), sample


def open_runs(runs: Sequence[Path], overrides: Sequence[str] = ()):
    """``(config, format, loaded runs, submission)`` of one run or an ensemble: the first run's config
    picks the task and the format, the task checks both, and each run's ``predict.checkpoint`` is
    loaded. ``make submit`` and ``kseg predict`` open runs this one way."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise ConfigError("no run given")
    cfg = run_config(runs[0], overrides)
    task = get_task(cfg)
    fmt = get_format(cfg.submission.format)
    task.check_format(fmt, runs, tuple(FORMATS.values()))
    members = [m for r in runs for m in load_members(r, str(cfg.predict.checkpoint), overrides)]
    return cfg, fmt, members, task.submission(members, fmt, overrides)


def make_submission(runs: Sequence[str | Path], overrides: Sequence[str] = (), test_dir: str | Path | None = None,
                    sample: str | Path | None = None, out_dir: str | Path | None = None,
                    data_root: str | Path | None = None, progress: bool = True,
                    output: str | Path | None = None) -> SubmissionResult:
    """Predict every test image with the run(s), write the CSV and contact sheet, validate the CSV.

    ``runs``: one run directory, or several (e.g. one per fold) whose probabilities are averaged
    when the family can; the first run's config decides format, post-processing and TTA.
    ``test_dir`` and ``sample`` replace the config's test folder and sample submission; given a
    ``test_dir`` alone, its images define the rows (the config's sample submission lists another
    folder's ids). ``output`` is the exact CSV path to write (e.g. ``/kaggle/working/submission.csv``,
    the contact sheet beside it as ``.png``); without it a new ``<dataset>-<run>-<time>.csv`` goes into
    ``out_dir`` (default: ``submission.dir``).
    """
    runs = [Path(r) for r in runs]
    if not runs:
        raise ConfigError("no run to submit from")
    if data_root is not None:
        overrides = [f"dataset.root={data_root}", *overrides]
    for run in runs:
        if run_state(run) == "running":
            state = "being trained" if in_use(run) else "unfinished (its training stopped)"
            log.warning(f"warning: run {run} is {state}: its checkpoints are from the epochs done so far")
    cfg, fmt, members, submission = open_runs(runs, overrides)
    items, sample = test_items(cfg, fmt, test_dir, sample)

    bad = unreadable_images(items, str(cfg.submission.on_error))
    csv_path = Path(output) if output is not None else submission_path(cfg, runs, out_dir)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    cache = PredictionCache(csv_path.parent / CACHE_FOLDER, [m.run_dir / f"{m.checkpoint}.keras" for m in members],
                            {"config": {k: cfg.to_dict().get(k) for k in CACHE_SECTIONS},
                             "postprocess": submission.postprocess, "overrides": list(overrides)})

    rows, sizes, panels = [], {}, []
    sheet_count = int(cfg.submission.sheet_images or 0)
    num_classes = None
    for image_id, path in tqdm(items, desc="predict", unit="img", disable=not progress, file=sys.stderr):
        if image_id in bad:  # predicted as "nothing found"; listed above
            rows.extend(target_rows(image_id, nothing(fmt), fmt, num_classes))
            sizes[image_id] = (1, 1)
            continue
        cached = cache.get(image_id, path)
        if cached is not None:
            image_rows, sizes[image_id], panel = cached["rows"], cached["size"], cached["panel"]
            num_classes = num_classes or cached["num_classes"]
        else:
            image = submission.read(path)
            target = submission.predict(image)
            num_classes = num_classes or submission.num_classes
            image_rows = target_rows(image_id, target, fmt, num_classes)
            sizes[image_id] = image.shape[:2]
            panel = outline_panel(*submission.panel(image, target)) if len(panels) < sheet_count else None
            cache.put(image_id, path, image_rows, sizes[image_id], num_classes, panel)
        rows.extend(image_rows)
        if len(panels) < sheet_count and panel is not None:
            panels.append(panel)

    write_submission(csv_path, rows, fmt)
    sheet = write_png(csv_path.with_suffix(".png"), contact_sheet(panels)) if panels else None
    report = validate_submission(csv_path, fmt, sizes, sample=sample, expected_ids=[i for i, _ in items],
                                 num_classes=num_classes if fmt.rows == "image_class" else None)
    cache.clear_used()
    return SubmissionResult(csv_path, sheet, report, dict(submission.postprocess), list(runs), sorted(bad))
