"""From one image's target to CSV rows, and the rows to a CSV file (atomically).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from kseg.codecs import rle
from kseg.codecs.prediction_string import box_prediction_string
from kseg.codecs.relative import to_relative
from kseg.core.config import project_path
from kseg.core.errors import ConfigError
from kseg.core.fileio import atomic_path
from kseg.submission.formats import SubmissionFormat, encode_cell


def box_rows(image_id: str, boxes_xyxy, scores, decimals: int = 1) -> list[tuple]:
    """The one CSV row of an image for a box format (for :func:`write_submission`)."""
    return [(image_id, box_prediction_string(boxes_xyxy, scores, decimals))]


def prediction_rows(image_id: str, target: np.ndarray, fmt: SubmissionFormat,
                    num_classes: int = 1) -> list[tuple]:
    """CSV rows of one image's target (from :func:`probabilities_to_target`)."""
    if fmt.boxes:
        raise ConfigError(f"format {fmt.name} writes boxes: use box_rows(image_id, boxes_xyxy, scores)")
    if fmt.rows == "instance":
        cells = rle.labels_to_rles(np.asarray(target, np.int32), fmt.order)
        if fmt.relative:
            cells = [to_relative(c) for c in cells]
        return [(image_id, c) for c in cells] or [(image_id, fmt.empty)]
    if fmt.rows == "image":
        return [(image_id, encode_cell(target > 0, fmt))]
    return [(image_id, k, encode_cell(target == k, fmt)) for k in range(1, num_classes + 1)]


def write_submission(path: str | Path, rows: Iterable[tuple], fmt: SubmissionFormat) -> Path:
    """Write rows under the format's header, atomically (a crash never leaves half a file)."""

    path = Path(path)
    frame = pd.DataFrame(list(rows), columns=list(fmt.columns))
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")
    return path


def stamped_path(directory: Path, stem: str, suffix: str) -> Path:
    path = directory / f"{stem}{suffix}"
    counter = 1
    while path.exists():
        path = directory / f"{stem}-{counter}{suffix}"
        counter += 1
    return path


def submission_path(cfg, runs: Sequence[Path], out_dir) -> Path:
    """A new file name ``<dataset>-<run>[-ensN]-<time>.csv`` in ``out_dir`` (default: submission.dir)."""
    out_dir = project_path(out_dir if out_dir is not None else cfg.submission.dir)
    run_name = runs[0].name + (f"-ens{len(runs)}" if len(runs) > 1 else "")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return stamped_path(out_dir, f"{cfg.dataset.name}-{run_name}-{stamp}", ".csv")
