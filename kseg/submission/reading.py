"""Reading a submission (or solution) CSV back the way a scorer would: rows, ids, and the masks
or boxes they decode to, with every problem named by CSV line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from kseg.codecs import rle
from kseg.codecs.prediction_string import PredictionStringError, parse_prediction_string
from kseg.codecs.relative import to_absolute
from kseg.core.errors import ConfigError, DataError
from kseg.io.csv_rle import (
    CLASS_COLUMNS,
    ID_COLUMNS,
    RLE_COLUMNS,
    find_column,
    read_csv_strings,
)
from kseg.io.sample import read_image
from kseg.submission.formats import SubmissionFormat, decode_cell

# --- reading back -----------------------------------------------------------------------------
MAX_REPORTED = 25


class SubmissionError(DataError):
    """A submission file that would be rejected or misread; lists every problem found."""

    def __init__(self, path: str | Path, problems: Sequence[str]):
        self.problems = list(problems)
        shown = self.problems[:MAX_REPORTED]
        more = len(self.problems) - len(shown)
        text = f"{len(self.problems)} problem(s):\n  " + "\n  ".join(shown)
        if more:
            text += f"\n  ... and {more} more"
        super().__init__(text, path)


@dataclasses.dataclass(frozen=True)
class CsvRow:
    line: int  # the header is line 1
    image_id: str
    cell: str
    class_id: int | None = None


def csv_where(fmt: SubmissionFormat, line: int, image_id: str) -> str:
    return f"line {line} ({fmt.id_column} {image_id!r})"


def read_rows(path: str | Path, fmt: SubmissionFormat, strict_header: bool = True
              ) -> tuple[list[CsvRow], list[str], dict[str, tuple[int, int]]]:
    """(rows, problems, sizes). ``strict_header``: the header must be the format's columns
    exactly; otherwise (ground-truth files) columns are found by name and extra ones ignored,
    except ``Height``/``Width`` (Kaggle solution files), which give ``sizes``."""

    path = Path(path)
    frame = read_csv_strings(path)
    header = [str(c) for c in frame.columns]
    sizes: dict[str, tuple[int, int]] = {}
    if strict_header:
        if header != list(fmt.columns):
            raise SubmissionError(path, [f"line 1: header is {','.join(header)!r}; format {fmt.name} "
                                         f"needs exactly {','.join(fmt.columns)!r}"])
        names = list(fmt.columns)
    else:
        lookup = {c.lower(): c for c in header}
        kinds = [(ID_COLUMNS, "image id"), (CLASS_COLUMNS, "class"), (RLE_COLUMNS, "run-length")]
        if fmt.rows != "image_class":
            kinds.pop(1)
        names = [lookup.get(column.lower()) or find_column(header, None, candidates, what, path)
                 for column, (candidates, what) in zip(fmt.columns, kinds)]
        if "height" in lookup and "width" in lookup:
            for image_id, h, w in zip(frame[names[0]], frame[lookup["height"]], frame[lookup["width"]]):
                if h.strip().isdigit() and w.strip().isdigit():
                    sizes.setdefault(image_id, (int(h), int(w)))
    ids = frame[names[0]].tolist()
    cells = frame[names[-1]].tolist()
    classes = frame[names[1]].tolist() if fmt.rows == "image_class" else [None] * len(ids)
    rows, problems = [], []
    for index, (image_id, cell, class_text) in enumerate(zip(ids, cells, classes)):
        line = index + 2
        if not image_id.strip():
            problems.append(f"line {line} ({fmt.id_column} ''): empty {fmt.id_column}")
            continue
        class_id = None
        if class_text is not None:
            text = class_text.strip()
            if not text.isdigit() or int(text) < 1:
                problems.append(f"{csv_where(fmt, line, image_id)}: {fmt.columns[1]} {class_text!r} is not a "
                                "class number (classes count from 1)")
                continue
            class_id = int(text)
        rows.append(CsvRow(line, image_id, cell, class_id))
    return rows, problems, sizes


def sample_ids(path: str | Path, fmt: SubmissionFormat) -> dict[str, int]:
    """Image ids of a sample submission -> the line of their first row (``x.jpg_1`` -> ``x.jpg``)."""

    path = Path(path)
    frame = read_csv_strings(path)
    if frame.empty:
        raise DataError("sample submission has no rows", path)
    header = list(frame.columns)
    column = find_column(header, fmt.id_column if fmt.id_column in header else None, ID_COLUMNS,
                         "image id", path, required=False) or header[0]
    ids = frame[column].str.strip()
    if column.lower() == "imageid_classid":
        ids = ids.str.rsplit("_", n=1).str[0]
    first: dict[str, int] = {}
    for line, image_id in enumerate(ids.tolist(), start=2):
        first.setdefault(image_id, line)
    return first


def image_sizes(items: Iterable[tuple[str, Path]]) -> dict[str, tuple[int, int]]:
    """``id -> (height, width)`` from image headers (no pixel decoding where PIL can read it)."""
    from PIL import Image

    sizes = {}
    for image_id, path in items:
        try:
            with Image.open(path) as handle:
                width, height = handle.size
        except Exception:  # noqa: BLE001 - formats PIL cannot open are decoded in full
            height, width = read_image(path).shape[:2]
        sizes[image_id] = (int(height), int(width))
    return sizes


def target_of_rows(rows: Sequence[CsvRow], shape: tuple[int, int], fmt: SubmissionFormat, num_classes: int | None):
    """Decode one image's rows strictly: labels (instance), mask (image) or H x W x K (classes)."""
    if fmt.rows == "instance":
        filled = [r for r in rows if r.cell.strip() != fmt.empty]
        cells = [to_absolute(r.cell, csv_where(fmt, r.line, r.image_id)) if fmt.relative else r.cell for r in filled]
        labels = rle.rles_to_labels(cells, shape, fmt.order, row=[csv_where(fmt, r.line, r.image_id) for r in filled])
        return np.ascontiguousarray(labels)
    if fmt.rows == "image":
        return np.ascontiguousarray(decode_cell(rows[0].cell, shape, fmt, csv_where(fmt, rows[0].line, rows[0].image_id)))
    depth = max([num_classes or 0] + [r.class_id for r in rows])
    stack = np.zeros((*shape, max(depth, 1)), np.uint8)
    for r in rows:
        stack[..., r.class_id - 1] = decode_cell(r.cell, shape, fmt, csv_where(fmt, r.line, r.image_id))
    return stack


def read_targets(path: str | Path, fmt: SubmissionFormat, sizes: Mapping[str, tuple[int, int]] | None = None,
                 strict_header: bool = True, num_classes: int | None = None) -> dict[str, np.ndarray]:
    """Decode a submission or solution CSV into one target array per image id (see evaluate).

    Sizes come from ``Height``/``Width`` columns when the file has them (Kaggle solution files
    do), else from ``sizes``. Decoding is as strict as the validator's. Masks only: a box format
    raises ConfigError (read it with :func:`read_box_targets`).
    """
    if fmt.boxes:
        raise ConfigError(f"format {fmt.name} is a box format: read it with kseg.submission.reading.read_box_targets "
                          "(boxes and scores per image), not read_targets (masks)")
    path = Path(path)
    rows, problems, own_sizes = read_rows(path, fmt, strict_header)
    if problems:
        raise SubmissionError(path, problems)
    grouped: dict[str, list[CsvRow]] = {}
    for row in rows:
        grouped.setdefault(row.image_id, []).append(row)
    targets = {}
    for image_id, image_rows in grouped.items():
        shape = own_sizes.get(image_id) or (sizes or {}).get(image_id)
        if shape is None:
            raise DataError(f"{csv_where(fmt, image_rows[0].line, image_id)}: image size unknown (no Height/Width "
                            "columns and no test image of this id)", path)
        if fmt.rows == "image" and len(image_rows) > 1:
            raise DataError(f"{csv_where(fmt, image_rows[1].line, image_id)}: duplicate of line "
                            f"{image_rows[0].line} (one row per image)", path)
        targets[image_id] = target_of_rows(image_rows, shape, fmt, num_classes)
    return targets


def read_box_targets(path: str | Path, fmt: SubmissionFormat,
                     sizes: Mapping[str, tuple[int, int]] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """A box submission as ``{image_id: {"boxes": (K, 4) xyxy, "scores": (K,), "labels": ones (K,)}}``,
    the per-image dicts of :func:`kseg.metrics.detection.voc_map` (one class).

    As strict as the validator per row (header, one row per image, every PredictionString);
    boxes are checked against the image only for ids in ``sizes``. Ids are not compared with a
    test set (that is :func:`validate_submission`'s job). Raises SubmissionError listing every problem.
    """
    if not fmt.boxes:
        raise ConfigError(f"format {fmt.name} is not a box format: read it with read_targets")
    path = Path(path)
    rows, problems, _ = read_rows(path, fmt, strict_header=True)
    targets: dict[str, dict[str, np.ndarray]] = {}
    first: dict[str, int] = {}
    for row in rows:
        where = csv_where(fmt, row.line, row.image_id)
        if row.image_id in first:
            problems.append(f"{where}: duplicate of line {first[row.image_id]} (one row per image)")
            continue
        first[row.image_id] = row.line
        try:
            boxes, scores = parse_prediction_string(row.cell, where, (sizes or {}).get(row.image_id))
        except PredictionStringError as exc:
            problems.append(str(exc))
            continue
        targets[row.image_id] = {"boxes": boxes, "scores": scores, "labels": np.ones(len(scores), np.int64)}
    if problems:
        raise SubmissionError(path, problems)
    return targets
