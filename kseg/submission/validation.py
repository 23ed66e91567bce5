"""The strict validator: a file is read back as a scorer would, and every problem is reported
with its CSV line (the header is line 1) and id, so a broken file is caught before it costs an
upload.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kseg.codecs.prediction_string import PredictionStringError, parse_prediction_string
from kseg.core.errors import RLEError
from kseg.io.csv_rle import read_csv_strings
from kseg.submission.formats import SubmissionFormat
from kseg.submission.reading import (
    CsvRow,
    SubmissionError,
    csv_where,
    read_rows,
    sample_ids,
    target_of_rows,
)


def _object_count(rows: Sequence[CsvRow], shape: tuple[int, int], fmt: SubmissionFormat,
                  num_classes: int | None) -> int:
    """Objects in one image's rows, decoded strictly (RLEError / PredictionStringError if not)."""
    if fmt.boxes:
        row = rows[0]
        return len(parse_prediction_string(row.cell, csv_where(fmt, row.line, row.image_id), shape)[1])
    target = target_of_rows(rows, shape, fmt, num_classes)
    if fmt.rows == "instance":
        return int(target.max(initial=0))
    return int(np.count_nonzero(target.reshape(-1, target.shape[-1] if target.ndim == 3 else 1).any(0)))


@dataclasses.dataclass
class ValidationReport:
    path: Path
    rows: int
    images: int
    objects: int  # instances (instance formats), non-empty masks, or boxes (box formats)


def validate_submission(path: str | Path, fmt: SubmissionFormat, sizes: Mapping[str, tuple[int, int]],
                        sample: str | Path | None = None, expected_ids: Sequence[str] | None = None,
                        num_classes: int | None = None) -> ValidationReport:
    """Check a submission as the scorer would read it; raise SubmissionError listing every problem.

    Ids must equal the sample submission's (or ``expected_ids``, else the keys of ``sizes``):
    none missing, none extra, no duplicate image (or image + class) where the format has one row
    per image. Every RLE decodes strictly within its image's size, instances of one image do not
    overlap, and an empty instance row is only allowed as an image's only row. A box format's
    PredictionString parses strictly (:func:`parse_prediction_string`) with every box inside its
    image; score order is not checked.
    """
    path = Path(path)
    rows, problems, _ = read_rows(path, fmt, strict_header=True)
    if sample is not None:
        expected = sample_ids(sample, fmt)
        where_expected = f"sample submission {Path(sample).name}"

        sample_header = [str(c) for c in read_csv_strings(Path(sample)).columns]
        if sample_header != list(fmt.columns):
            problems.insert(0, f"line 1: header {','.join(fmt.columns)!r} differs from the sample submission's "
                               f"{','.join(sample_header)!r} (is submission.format right?)")
    else:
        ids = list(expected_ids) if expected_ids is not None else list(sizes)
        expected = {i: n for n, i in enumerate(ids, start=1)}
        where_expected = "the test images"

    by_image: dict[str, list[CsvRow]] = {}
    seen: dict[object, int] = {}
    for row in rows:
        where = csv_where(fmt, row.line, row.image_id)
        if row.image_id not in expected:
            if row.image_id not in by_image:
                problems.append(f"{where}: id is not in {where_expected} (extra id)")
            by_image.setdefault(row.image_id, [])
            continue
        key = (row.image_id, row.class_id) if fmt.rows == "image_class" else row.image_id
        if fmt.rows != "instance" and key in seen:
            what = f"image and {fmt.columns[1]} {row.class_id}" if fmt.rows == "image_class" else "image"
            problems.append(f"{where}: duplicate of line {seen[key]} (one row per {what})")
            continue
        seen.setdefault(key, row.line)
        if fmt.rows == "image_class" and num_classes and row.class_id > num_classes:
            problems.append(f"{where}: {fmt.columns[1]} {row.class_id} is above the {num_classes} classes")
            continue
        if fmt.empty and not row.cell.strip():
            problems.append(f"{where}: empty {fmt.rle_column}; format {fmt.name} writes {fmt.empty!r} "
                            "for an image without object")
            continue
        by_image.setdefault(row.image_id, []).append(row)

    objects = 0
    for image_id, image_rows in by_image.items():
        if image_id not in expected or not image_rows:
            continue
        if fmt.rows == "instance" and len(image_rows) > 1:
            empty = [r for r in image_rows if r.cell.strip() == fmt.empty]
            for r in empty:
                problems.append(f"{csv_where(fmt, r.line, image_id)}: empty {fmt.rle_column} row, but the image has "
                                f"{len(image_rows) - 1} other row(s); an empty row is only allowed as an "
                                "image's only row")
            if empty:
                continue
        shape = sizes.get(image_id)
        if shape is None:
            problems.append(f"{csv_where(fmt, image_rows[0].line, image_id)}: no test image of this id to check "
                            f"the {'boxes' if fmt.boxes else 'RLE'} against (pass the test folder)")
            continue
        try:
            objects += _object_count(image_rows, shape, fmt, num_classes)
        except (RLEError, PredictionStringError) as exc:
            problems.append(str(exc))

    present = {r.image_id for r in rows}
    missing = [(line, i) for i, line in expected.items() if i not in present]
    for line, image_id in missing:
        origin = f"{where_expected} line {line}" if sample is not None else f"test image {line}"
        problems.append(f"{fmt.id_column} {image_id!r} ({origin}) has no row in the submission (missing id)")
    if problems:
        raise SubmissionError(path, problems)
    return ValidationReport(path, len(rows), len(present), objects)
