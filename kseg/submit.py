"""Submission files: per-competition CSV writers, a strict validator, and ``make submit``.

A :class:`SubmissionFormat` says what one CSV row is and how masks are run-length encoded (or,
for a detection format, how boxes are written):

    dsb_instances     ImageId,EncodedPixels           one row per instance, order F; an image with
    airbus_instances  ImageId,EncodedPixels           no object gets one row with an empty cell
    sartorius         id,predicted                    one row per instance, order C (row-major)
    tgs_salt          id,rle_mask                     one row per image, order F
    carvana           img,rle_mask                    one row per image, order C
    severstal         ImageId,ClassId,EncodedPixels   one row per image and class, order F
    siim_acr          ImageId,EncodedPixels           one row per image, relative RLE, "-1" if empty
    wheat_boxes       image_id,PredictionString       one row per image (rows kind image_boxes):
                                                      groups "score x y w h", empty if no box

Box formats (``SubmissionFormat.boxes``) hold no RLE: boxes in kseg are float (K, 4) pixel corners ``(x_min, y_min, x_max, y_max)`` with no +1
(``w = x_max - x_min``, as :mod:`kseg.detection_metrics`); :func:`box_prediction_string` and
:func:`parse_prediction_string` convert to and from the Global Wheat Detection cell, and
:func:`read_box_targets` reads a box file back for local scoring with ``voc_map``.

The validator reads a file back the way a scorer would and reports every problem with its CSV
line (the header is line 1) and id, so a broken file is caught before it costs an upload.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from kseg import rle
from kseg.errors import ConfigError, DataError, KsegError, RLEError

ROW_KINDS = ("instance", "image", "image_class", "image_boxes")
POSTPROCESS_KEYS = ("method", "threshold", "min_size", "marker_threshold", "second_channel")
MAX_REPORTED = 25


@dataclasses.dataclass(frozen=True)
class SubmissionFormat:
    """How one competition wants predictions written (see the module docstring)."""

    name: str
    columns: tuple[str, ...]
    rows: str  # instance | image | image_class | image_boxes (detection: one PredictionString per image)
    order: str  # "F" column-major | "C" row-major ("" for box formats: no RLE)
    id_style: str = "stem"  # test ids without a sample submission: file stem or file name
    empty: str = ""  # the cell of an image (or class) without any object
    relative: bool = False  # starts count from the end of the previous run (SIIM-ACR)
    metric: str = "iou_map"  # iou_map | f2 | tgs_iou_map | dice | voc_map (box formats)
    competition: str = ""

    @property
    def id_column(self) -> str:
        return self.columns[0]

    @property
    def rle_column(self) -> str:
        """The last column: the RLE cell, or a box format's PredictionString."""
        return self.columns[-1]

    @property
    def boxes(self) -> bool:
        """A detection format: cells are box groups, not run-length masks."""
        return self.rows == "image_boxes"


FORMATS: dict[str, SubmissionFormat] = {f.name: f for f in (
    SubmissionFormat("dsb_instances", ("ImageId", "EncodedPixels"), "instance", "F", "stem",
                     metric="iou_map", competition="Data Science Bowl 2018"),
    SubmissionFormat("airbus_instances", ("ImageId", "EncodedPixels"), "instance", "F", "name",
                     metric="f2", competition="Airbus Ship Detection"),
    SubmissionFormat("sartorius", ("id", "predicted"), "instance", "C", "stem",
                     metric="iou_map", competition="Sartorius Cell Instance Segmentation"),
    SubmissionFormat("tgs_salt", ("id", "rle_mask"), "image", "F", "stem",
                     metric="tgs_iou_map", competition="TGS Salt Identification"),
    SubmissionFormat("carvana", ("img", "rle_mask"), "image", "C", "name",
                     metric="dice", competition="Carvana Image Masking"),
    SubmissionFormat("severstal", ("ImageId", "ClassId", "EncodedPixels"), "image_class", "F", "name",
                     metric="dice", competition="Severstal Steel Defect Detection"),
    SubmissionFormat("siim_acr", ("ImageId", "EncodedPixels"), "image", "F", "stem", empty="-1",
                     relative=True, metric="dice", competition="SIIM-ACR Pneumothorax Segmentation"),
    SubmissionFormat("wheat_boxes", ("image_id", "PredictionString"), "image_boxes", "", "stem",
                     metric="voc_map", competition="Global Wheat Detection"),
)}


def get_format(name: str) -> SubmissionFormat:
    if name not in FORMATS:
        raise ConfigError(f"submission.format {name!r} is not one of {', '.join(FORMATS)}")
    return FORMATS[name]


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


# --- run-length cells ---------------------------------------------------------------------------
_INTEGER = re.compile(r"-?[0-9]+")


def to_relative(absolute: str) -> str:
    """Absolute Kaggle RLE (1-based starts) -> SIIM-ACR relative RLE (gaps, first start 0-based)."""
    if not absolute:
        return ""
    values = np.array(absolute.split(), np.int64)
    starts0, lengths = values[0::2] - 1, values[1::2]
    gaps = starts0 - np.concatenate(([0], starts0[:-1] + lengths[:-1]))
    out = np.empty_like(values)
    out[0::2], out[1::2] = gaps, lengths
    return " ".join(map(str, out.tolist()))


def to_absolute(relative: str, row: object = None) -> str:
    """SIIM-ACR relative RLE -> absolute Kaggle RLE, so :func:`kseg.rle.decode` checks it strictly."""
    tokens = relative.split()
    for position, token in enumerate(tokens, start=1):
        if not _INTEGER.fullmatch(token):
            raise RLEError(f"relative RLE token {position} of {len(tokens)} is {token!r}, not an integer", row)
    if len(tokens) % 2:
        raise RLEError(f"relative RLE has {len(tokens)} tokens; expected offset/length pairs", row)
    values = np.array([int(t) for t in tokens], np.int64)
    gaps, lengths = values[0::2], values[1::2]
    if gaps.size and gaps.min() < 0:
        k = int(np.argmax(gaps < 0))
        raise RLEError(f"relative RLE run {k + 1}: offset {gaps[k]} is negative", row)
    starts0 = np.cumsum(gaps) + np.concatenate(([0], np.cumsum(lengths)[:-1]))
    out = np.empty_like(values)
    out[0::2], out[1::2] = starts0 + 1, lengths
    return " ".join(map(str, out.tolist()))


def encode_cell(mask: np.ndarray, fmt: SubmissionFormat) -> str:
    """One mask as the format's RLE cell (the format's empty marker when nothing is set)."""
    text = rle.encode(mask, fmt.order)
    if not text:
        return fmt.empty
    return to_relative(text) if fmt.relative else text


def decode_cell(text: str, shape: tuple[int, int], fmt: SubmissionFormat, row: object = None) -> np.ndarray:
    """Strict inverse of :func:`encode_cell`: a uint8 0/1 mask, or RLEError naming ``row``."""
    text = text.strip()
    if text == fmt.empty or (fmt.relative and not text):
        return np.zeros(shape, np.uint8)
    if fmt.relative:
        text = to_absolute(text, row)
    return rle.decode(text, shape, fmt.order, row=row)


# --- box cells (detection formats) ------------------------------------------------------------------
BOX_FIELDS = ("score", "x", "y", "w", "h")
BOX_SLACK = 0.5  # pixels a box may reach past the image border (rounding of pixel coordinates)
_NUMBER = r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"  # no nan, inf, hex or 1_0
_TOKEN = re.compile(_NUMBER)
_TOKENS = re.compile(rf"\s*{_NUMBER}(?:\s+{_NUMBER})*\s*")


class PredictionStringError(DataError):
    """A PredictionString that does not parse strictly (names the row and the box group)."""


def box_prediction_string(boxes_xyxy, scores, decimals: int = 1) -> str:
    """One image's boxes as a Global Wheat Detection cell: ``score x y w h`` groups, best first.

    ``boxes_xyxy``: float (K, 4) pixel corners ``(x_min, y_min, x_max, y_max)``, no +1. Scores are
    written with 4 decimals, x y w h with ``decimals`` (0 writes integers). The corners are rounded
    and ``w``, ``h`` taken between the rounded corners, so a box inside the image stays inside; a
    box with no width or height after rounding is left out (it can only be a false positive).
    Ties in score keep their input order. No box gives "".
    """
    boxes = np.asarray(boxes_xyxy, np.float64)
    boxes = boxes.reshape(0, 4) if boxes.size == 0 else boxes
    scores = np.asarray(scores, np.float64).reshape(-1)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise DataError(f"boxes must have shape (K, 4) in (x_min, y_min, x_max, y_max), got {boxes.shape}")
    if scores.shape[0] != boxes.shape[0]:
        raise DataError(f"{boxes.shape[0]} boxes but {scores.shape[0]} scores")
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise DataError("boxes and scores must be finite numbers")
    if scores.size and (scores.min() < 0 or scores.max() > 1):
        raise DataError(f"scores must lie in [0, 1], got {scores.min():g} .. {scores.max():g}")
    if int(decimals) != decimals or decimals < 0:
        raise ConfigError(f"decimals={decimals!r} must be a whole number >= 0")
    decimals = int(decimals)
    order = np.argsort(-scores, kind="stable")
    corners = np.round(boxes[order], decimals) + 0.0  # + 0.0: no "-0"
    sides = np.round(corners[:, 2:] - corners[:, :2], decimals)
    keep = (sides > 0).all(axis=1)
    table = np.column_stack([scores[order], corners[:, :2], sides])[keep]
    group = " ".join(["%.4f"] + [f"%.{decimals}f"] * 4)
    return " ".join([group] * len(table)) % tuple(table.ravel().tolist())


def parse_prediction_string(text: str, where: str = "", size: tuple[int, int] | None = None
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Strict inverse of :func:`box_prediction_string`: ``(boxes_xyxy float64 (K, 4), scores (K,))``.

    Every token must be a finite decimal number, their count a multiple of 5, each score in
    [0, 1] and each w, h > 0; with ``size`` = (height, width) each box must also lie in the
    image (``BOX_SLACK`` pixels of slack). Score order is not checked (the scorer sorts). Raises
    PredictionStringError naming ``where`` (e.g. the CSV line and id) and the first bad group.
    """
    def fail(message: str):
        raise PredictionStringError(message, where or None)

    tokens = text.split()
    if not tokens:
        return np.zeros((0, 4)), np.zeros(0)
    if len(tokens) % 5:
        fail(f"PredictionString has {len(tokens)} tokens, not a multiple of 5 (groups 'score x y w h'); the last "
             f"group, {len(tokens) // 5 + 1}, has {len(tokens) % 5}")
    if not _TOKENS.fullmatch(text):
        index = next(i for i, t in enumerate(tokens) if not _TOKEN.fullmatch(t))
        fail(f"group {index // 5 + 1}: {BOX_FIELDS[index % 5]} is {tokens[index]!r}, not a finite number")
    table = np.array(tokens, np.float64).reshape(-1, 5)
    if not np.isfinite(table).all():  # 1e999 overflows
        index = int(np.flatnonzero(~np.isfinite(table.ravel()))[0])
        fail(f"group {index // 5 + 1}: {BOX_FIELDS[index % 5]} is {tokens[index]!r}, not a finite number")
    scores, x, y, w, h = table.T
    height, width = size if size is not None else (np.inf, np.inf)
    checks = np.stack([(scores < 0) | (scores > 1), w <= 0, h <= 0,
                       (x < -BOX_SLACK) | (y < -BOX_SLACK) | (x + w > width + BOX_SLACK) | (y + h > height + BOX_SLACK)])
    bad = np.flatnonzero(checks.any(axis=0))
    if bad.size:
        k = int(bad[0])
        score, xt, yt, wt, ht = tokens[5 * k:5 * k + 5]
        reasons = [f"score {score} is outside [0, 1]", f"width {wt} is not positive", f"height {ht} is not positive",
                   f"box x y w h = {xt} {yt} {wt} {ht} is outside the {width} x {height} (W x H) image"]
        message = "; ".join(r for r, failed in zip(reasons, checks[:, k]) if failed)
        more = f" (and {bad.size - 1} more bad group(s))" if bad.size > 1 else ""
        fail(f"group {k + 1}: {message}{more}")
    return np.column_stack([x, y, x + w, y + h]), scores


def box_rows(image_id: str, boxes_xyxy, scores, decimals: int = 1) -> list[tuple]:
    """The one CSV row of an image for a box format (for :func:`write_submission`)."""
    return [(image_id, box_prediction_string(boxes_xyxy, scores, decimals))]


# --- from probabilities to rows ---------------------------------------------------------------------
def probabilities_to_target(probabilities: np.ndarray, fmt: SubmissionFormat, post: Mapping,
                            targets: str = "mask") -> np.ndarray:
    """What the format writes: int32 instance labels, a 0/1 mask, or a uint8 class-index mask.

    ``targets`` is the run's ``generator.targets``: ``classes`` models give softmax channels
    (index = class, 0 = background); all others give channel 0 = foreground probability.
    """
    from skimage import measure

    from kseg.postprocess import clean_mask, instances_from_probabilities

    params = {k: post[k] for k in POSTPROCESS_KEYS if k in post}
    min_size = int(params.get("min_size", 0))
    if probabilities.ndim == 2:
        probabilities = probabilities[..., None]
    if targets == "classes":
        classes = np.argmax(probabilities, axis=-1).astype(np.uint8)
        if fmt.rows == "instance":
            labels = np.zeros(classes.shape, np.int32)
            for k in range(1, probabilities.shape[-1]):
                part = measure.label(clean_mask(classes == k, min_size), connectivity=1)
                labels = np.where(part > 0, part + labels.max(), labels).astype(np.int32)
            return labels
        out = np.zeros(classes.shape, np.uint8)
        for k in range(1, probabilities.shape[-1]):
            out[clean_mask(classes == k, min_size)] = k
        return (out > 0).astype(np.uint8) if fmt.rows == "image" else out
    if fmt.rows == "instance":
        return instances_from_probabilities(probabilities, **params)
    threshold = float(params.get("threshold", 0.5))
    return clean_mask(probabilities[..., 0] > threshold, min_size).astype(np.uint8)


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
    from kseg.fileio import atomic_path

    path = Path(path)
    frame = pd.DataFrame(list(rows), columns=list(fmt.columns))
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")
    return path


# --- reading back -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CsvRow:
    line: int  # the header is line 1
    image_id: str
    cell: str
    class_id: int | None = None


def _where(fmt: SubmissionFormat, line: int, image_id: str) -> str:
    return f"line {line} ({fmt.id_column} {image_id!r})"


def read_rows(path: str | Path, fmt: SubmissionFormat, strict_header: bool = True
              ) -> tuple[list[CsvRow], list[str], dict[str, tuple[int, int]]]:
    """(rows, problems, sizes). ``strict_header``: the header must be the format's columns
    exactly; otherwise (ground-truth files) columns are found by name and extra ones ignored,
    except ``Height``/``Width`` (Kaggle solution files), which give ``sizes``."""
    from kseg.io.csv_rle import CLASS_COLUMNS, ID_COLUMNS, RLE_COLUMNS, find_column, read_csv_strings

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
                problems.append(f"{_where(fmt, line, image_id)}: {fmt.columns[1]} {class_text!r} is not a "
                                "class number (classes count from 1)")
                continue
            class_id = int(text)
        rows.append(CsvRow(line, image_id, cell, class_id))
    return rows, problems, sizes


def sample_ids(path: str | Path, fmt: SubmissionFormat) -> dict[str, int]:
    """Image ids of a sample submission -> the line of their first row (``x.jpg_1`` -> ``x.jpg``)."""
    from kseg.io.csv_rle import ID_COLUMNS, find_column, read_csv_strings

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

    from kseg.io.sample import read_image

    sizes = {}
    for image_id, path in items:
        try:
            with Image.open(path) as handle:
                width, height = handle.size
        except Exception:  # noqa: BLE001 - formats PIL cannot open are decoded in full
            height, width = read_image(path).shape[:2]
        sizes[image_id] = (int(height), int(width))
    return sizes


def _target_of_rows(rows: Sequence[CsvRow], shape: tuple[int, int], fmt: SubmissionFormat, num_classes: int | None):
    """Decode one image's rows strictly: labels (instance), mask (image) or H x W x K (classes)."""
    if fmt.rows == "instance":
        filled = [r for r in rows if r.cell.strip() != fmt.empty]
        cells = [to_absolute(r.cell, _where(fmt, r.line, r.image_id)) if fmt.relative else r.cell for r in filled]
        labels = rle.rles_to_labels(cells, shape, fmt.order, row=[_where(fmt, r.line, r.image_id) for r in filled])
        return np.ascontiguousarray(labels)
    if fmt.rows == "image":
        return np.ascontiguousarray(decode_cell(rows[0].cell, shape, fmt, _where(fmt, rows[0].line, rows[0].image_id)))
    depth = max([num_classes or 0] + [r.class_id for r in rows])
    stack = np.zeros((*shape, max(depth, 1)), np.uint8)
    for r in rows:
        stack[..., r.class_id - 1] = decode_cell(r.cell, shape, fmt, _where(fmt, r.line, r.image_id))
    return stack


def _object_count(rows: Sequence[CsvRow], shape: tuple[int, int], fmt: SubmissionFormat,
                  num_classes: int | None) -> int:
    """Objects in one image's rows, decoded strictly (RLEError / PredictionStringError if not)."""
    if fmt.boxes:
        row = rows[0]
        return len(parse_prediction_string(row.cell, _where(fmt, row.line, row.image_id), shape)[1])
    target = _target_of_rows(rows, shape, fmt, num_classes)
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
        from kseg.io.csv_rle import read_csv_strings

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
        where = _where(fmt, row.line, row.image_id)
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
                problems.append(f"{_where(fmt, r.line, image_id)}: empty {fmt.rle_column} row, but the image has "
                                f"{len(image_rows) - 1} other row(s); an empty row is only allowed as an "
                                "image's only row")
            if empty:
                continue
        shape = sizes.get(image_id)
        if shape is None:
            problems.append(f"{_where(fmt, image_rows[0].line, image_id)}: no test image of this id to check "
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


def read_targets(path: str | Path, fmt: SubmissionFormat, sizes: Mapping[str, tuple[int, int]] | None = None,
                 strict_header: bool = True, num_classes: int | None = None) -> dict[str, np.ndarray]:
    """Decode a submission or solution CSV into one target array per image id (see evaluate).

    Sizes come from ``Height``/``Width`` columns when the file has them (Kaggle solution files
    do), else from ``sizes``. Decoding is as strict as the validator's. Masks only: a box format
    raises ConfigError (read it with :func:`read_box_targets`).
    """
    if fmt.boxes:
        raise ConfigError(f"format {fmt.name} is a box format: read it with kseg.submit.read_box_targets "
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
            raise DataError(f"{_where(fmt, image_rows[0].line, image_id)}: image size unknown (no Height/Width "
                            "columns and no test image of this id)", path)
        if fmt.rows == "image" and len(image_rows) > 1:
            raise DataError(f"{_where(fmt, image_rows[1].line, image_id)}: duplicate of line "
                            f"{image_rows[0].line} (one row per image)", path)
        targets[image_id] = _target_of_rows(image_rows, shape, fmt, num_classes)
    return targets


def read_box_targets(path: str | Path, fmt: SubmissionFormat,
                     sizes: Mapping[str, tuple[int, int]] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """A box submission as ``{image_id: {"boxes": (K, 4) xyxy, "scores": (K,), "labels": ones (K,)}}``,
    the per-image dicts of :func:`kseg.detection_metrics.voc_map` (one class).

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
        where = _where(fmt, row.line, row.image_id)
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


# --- pictures -----------------------------------------------------------------------------------
_PALETTE = np.array([[255, 64, 64], [64, 255, 64], [80, 160, 255], [255, 220, 0], [255, 64, 255],
                     [0, 255, 255], [255, 140, 0], [180, 255, 120]], np.uint8)


def outline_panel(image: np.ndarray, target: np.ndarray, size: int = 256) -> np.ndarray:
    """uint8 ``size`` x ``size`` x 3 thumbnail of an image with each object's outline drawn in
    its own colour (letterboxed, aspect kept). Outlines are found on the shrunken label image,
    so they stay one thumbnail pixel wide instead of vanishing when a large image shrinks."""
    import cv2
    from skimage.segmentation import find_boundaries

    rgb = image if image.ndim == 3 else image[..., None]
    rgb = np.repeat(rgb[..., :1], 3, axis=2) if rgb.shape[2] == 1 else rgb[..., :3]
    labels = target if target.ndim == 2 else np.argmax(target, axis=-1) * target.any(axis=-1)
    height, width = rgb.shape[:2]
    scale = min(1.0, size / max(height, width))
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    small = np.array(cv2.resize(np.ascontiguousarray(rgb), (new_w, new_h), interpolation=cv2.INTER_AREA))
    small = small if small.ndim == 3 else np.repeat(small[..., None], 3, axis=2)
    rows = np.minimum((np.arange(new_h) + 0.5) * height / new_h, height - 1).astype(np.intp)
    cols = np.minimum((np.arange(new_w) + 0.5) * width / new_w, width - 1).astype(np.intp)
    small_labels = np.asarray(labels)[rows[:, None], cols[None, :]].astype(np.int64)
    edges = find_boundaries(small_labels, mode="inner")
    small[edges] = _PALETTE[(small_labels[edges] - 1) % len(_PALETTE)]
    panel = np.zeros((size, size, 3), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    panel[top:top + new_h, left:left + new_w] = small
    return panel


def contact_sheet(panels: Sequence[np.ndarray], columns: int = 4, gap: int = 4) -> np.ndarray:
    """Equal-sized panels in a grid with white gaps."""
    size = panels[0].shape[0]
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    sheet = np.full((rows * size + (rows - 1) * gap, columns * size + (columns - 1) * gap, 3), 255, np.uint8)
    for index, panel in enumerate(panels):
        r, c = divmod(index, columns)
        sheet[r * (size + gap):r * (size + gap) + size, c * (size + gap):c * (size + gap) + size] = panel
    return sheet


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    import cv2

    from kseg.fileio import atomic_write_bytes

    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise DataError("could not encode PNG", path)
    atomic_write_bytes(path, data.tobytes())
    return Path(path)


# --- make submit ----------------------------------------------------------------------------------
def resolve_postprocess(run_dir: Path, cfg, overrides: Iterable[str] = ()) -> dict:
    """Post-processing for a run: config < tuned ``postprocess.json`` < explicit ``--set postprocess.*``."""
    from kseg.config import apply_overrides
    from kseg.predict import tuned_postprocess

    post = dict(cfg.postprocess)
    post.update({k: v for k, v in tuned_postprocess(run_dir).items() if k in POSTPROCESS_KEYS})
    explicit = [o for o in overrides if o.strip().startswith("postprocess.")]
    return apply_overrides({"postprocess": post}, explicit)["postprocess"] if explicit else post


def class_count(cfg, probabilities: np.ndarray) -> int:
    """Classes per image for per-class formats: ``submission.num_classes``, else the model's."""
    configured = (cfg.get("submission") or {}).get("num_classes")
    if configured:
        return int(configured)
    return probabilities.shape[-1] - 1 if cfg.generator.targets == "classes" else 1


@dataclasses.dataclass
class SubmissionResult:
    csv: Path
    sheet: Path | None
    report: ValidationReport
    postprocess: dict
    runs: list[Path]


def _stamped_path(directory: Path, stem: str, suffix: str) -> Path:
    path = directory / f"{stem}{suffix}"
    counter = 1
    while path.exists():
        path = directory / f"{stem}-{counter}{suffix}"
        counter += 1
    return path


def _submission_path(cfg, runs: Sequence[Path], out_dir) -> Path:
    from kseg.config import project_path

    out_dir = project_path(out_dir if out_dir is not None else (cfg.get("submission") or {}).get("dir", "submissions"))
    run_name = runs[0].name + (f"-ens{len(runs)}" if len(runs) > 1 else "")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return _stamped_path(out_dir, f"{cfg.dataset.name}-{run_name}-{stamp}", ".csv")


def _check_format_fits_model(fmt: SubmissionFormat, cfg, runs: Sequence[Path]) -> None:
    """Box formats need a box detector run, a Mask R-CNN run an instance format; detector runs
    are submitted one at a time (averaging boxes or instances needs box fusion)."""
    from kseg.models import get_model_entry

    task = get_model_entry(cfg.model.name).task
    detector = task == "detection"
    if task == "instance" and fmt.rows != "instance":
        instance_formats = ", ".join(f.name for f in FORMATS.values() if f.rows == "instance")
        raise ConfigError(f"run {runs[0].name} is an instance detector ({cfg.model.name}); submission.format "
                          f"{fmt.name} is not an instance format ({instance_formats})")
    if task == "instance" and len(runs) > 1:
        raise ConfigError("Mask R-CNN runs cannot be averaged (that needs box / mask fusion); submit one run")
    if detector and not fmt.boxes:
        box_formats = ", ".join(f.name for f in FORMATS.values() if f.boxes)
        raise ConfigError(f"run {runs[0].name} is a box detector ({cfg.model.name}) but submission.format "
                          f"{fmt.name} holds masks; use a box format ({box_formats})")
    if fmt.boxes and not detector:
        raise ConfigError(f"submission.format {fmt.name} holds boxes but run {runs[0].name} is a segmentation "
                          f"model ({cfg.model.name})")
    if detector and len(runs) > 1:
        raise ConfigError("box runs cannot be averaged (that needs box fusion); submit one run")


def _write_and_validate(cfg, runs: Sequence[Path], out_dir, fmt: SubmissionFormat, rows, sizes, panels, sample,
                        items, post: dict, num_classes: int | None = None) -> SubmissionResult:
    """Write the rows and the contact sheet, then validate the CSV as the scorer would read it."""
    csv_path = _submission_path(cfg, runs, out_dir)
    write_submission(csv_path, rows, fmt)
    sheet = write_png(csv_path.with_suffix(".png"), contact_sheet(panels)) if panels else None
    report = validate_submission(csv_path, fmt, sizes, sample=sample, expected_ids=[i for i, _ in items],
                                 num_classes=num_classes if fmt.rows == "image_class" else None)
    return SubmissionResult(csv_path, sheet, report, post, list(runs))


def _detector_submission(member, cfg, fmt: SubmissionFormat, items, sample, out_dir,
                         progress: bool) -> SubmissionResult:
    """Rows of a detector run, image by image: boxes (box formats, drawn on the sheet) or Mask R-CNN
    instances (overlaps resolved by score, outlined like a segmentation run's)."""
    from tqdm.auto import tqdm

    from kseg.data.preprocess import to_channels
    from kseg.detection import draw_boxes, predict_detections, predict_instances
    from kseg.io.sample import read_image

    if fmt.boxes:
        post = {}

        def rows_and_picture(image_id, image):
            found = predict_detections(member.model, [image])[0]
            picture = draw_boxes(image, None, found)  # letterboxed below with no outlines
            return box_rows(image_id, found["boxes"], found["scores"]), picture, np.zeros(picture.shape[:2], np.int32)
    else:
        post = {"mask_threshold": float(cfg.detection.mask_threshold),
                "min_size": int(cfg.postprocess.get("min_size", 8))}

        def rows_and_picture(image_id, image):
            labels = predict_instances(member.model, [image], post["mask_threshold"], post["min_size"])[0]
            return prediction_rows(image_id, labels, fmt), image, labels

    sheet_count = int((cfg.get("submission") or {}).get("sheet_images", 8) or 0)
    rows, sizes, panels = [], {}, []
    for image_id, path in tqdm(items, desc="detect", unit="img", disable=not progress, file=sys.stderr):
        image = to_channels(read_image(path), int(cfg.preprocess.channels))
        image_rows, picture, outlines = rows_and_picture(image_id, image)
        rows.extend(image_rows)
        sizes[image_id] = image.shape[:2]
        if len(panels) < sheet_count:
            panels.append(outline_panel(picture, outlines))
    return _write_and_validate(cfg, [member.run_dir], out_dir, fmt, rows, sizes, panels, sample, items, post)


def make_submission(runs: Sequence[str | Path], overrides: Sequence[str] = (), test_dir: str | Path | None = None,
                    sample: str | Path | None = None, out_dir: str | Path | None = None,
                    data_root: str | Path | None = None, progress: bool = True) -> SubmissionResult:
    """Predict every test image with the run(s), write the CSV and contact sheet, validate the CSV.

    ``runs``: one run directory, or several (e.g. one per fold) whose probabilities are averaged;
    the first run's config decides format, post-processing and TTA. ``test_dir`` and ``sample``
    replace the config's test folder and sample submission; given a ``test_dir`` alone, its images
    define the rows (the config's sample submission lists another folder's ids).
    """
    from kseg.config import project_path
    from kseg.io.testset import discover_test_ids
    from kseg.predict import Predictor, load_run, run_config

    runs = [Path(r) for r in runs]
    if not runs:
        raise ConfigError("no run to submit from")
    if data_root is not None:
        overrides = [f"dataset.root={data_root}", *overrides]
    cfg = run_config(runs[0], overrides)
    checkpoint = str((cfg.get("predict") or {}).get("checkpoint", "best"))
    members = [load_run(r, checkpoint, overrides) for r in runs]
    fmt = get_format(cfg.submission.format)
    _check_format_fits_model(fmt, cfg, runs)
    root = project_path(cfg.dataset.root) if cfg.dataset.root else None
    if test_dir is None:
        if root is None or not cfg.dataset.test:
            raise ConfigError(f"dataset {cfg.dataset.name!r} names no test folder: pass TEST_DIR=folder "
                              "(--test-dir)")
        test_dir = root / cfg.dataset.test
        if sample is None and cfg.dataset.sample_submission:
            sample = root / cfg.dataset.sample_submission
    test_dir = Path(test_dir)
    if sample is not None and not Path(sample).is_file():
        raise DataError("sample submission does not exist", sample)
    items = discover_test_ids(test_dir, sample, id_style=fmt.id_style)
    from kseg.models import get_model_entry

    if get_model_entry(cfg.model.name).task in ("detection", "instance"):
        return _detector_submission(members[0], cfg, fmt, items, sample, out_dir, progress)
    post = resolve_postprocess(runs[0], cfg, overrides)
    predictor = Predictor(members)
    targets_spec = cfg.generator.targets
    sheet_count = int((cfg.get("submission") or {}).get("sheet_images", 8) or 0)

    rows, sizes, panels = [], {}, []
    num_classes = None
    for image_id, image, probabilities in predictor.predict_items(items, progress=progress):
        target = probabilities_to_target(probabilities, fmt, post, targets_spec)
        if num_classes is None:
            num_classes = class_count(cfg, probabilities)
        rows.extend(prediction_rows(image_id, target, fmt, num_classes))
        sizes[image_id] = image.shape[:2]
        if len(panels) < sheet_count:
            panels.append(outline_panel(image, target))

    return _write_and_validate(cfg, runs, out_dir, fmt, rows, sizes, panels, sample, items, post, num_classes)


def kaggle_submit(csv_path: str | Path, competition: str | None, message: str) -> bool:
    """Upload with the kaggle CLI (``kaggle competitions submit``) when it is installed.

    Without the executable nothing is uploaded and a warning says so (the CSV is still valid and
    kept); a failed upload raises, since the user asked for one.
    """
    executable = shutil.which("kaggle")
    if executable is None:
        print("warning: KAGGLE=1 but no kaggle command on the PATH (pip install kaggle); not uploaded",
              file=sys.stderr)
        return False
    if not competition:
        raise ConfigError("KAGGLE=1 needs submission.competition (the competition's URL slug) in the config")
    result = subprocess.run([executable, "competitions", "submit", "-c", competition, "-f", str(csv_path),
                             "-m", message], check=False)
    if result.returncode != 0:
        raise KsegError(f"kaggle competitions submit exited with status {result.returncode}")
    print(f"uploaded {csv_path} to {competition}", file=sys.stderr)
    return True
