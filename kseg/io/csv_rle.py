"""A folder of images plus a CSV of run-length encoded masks.

    Airbus      ImageId,EncodedPixels            one row per ship; an empty row = no ship
    DSB 2018    ImageId,EncodedPixels            ids without extension, one row per nucleus
    Severstal   ImageId,ClassId,EncodedPixels    one row per image and class, ClassId from 1
                (or the older ImageId_ClassId,EncodedPixels with ids such as ``x.jpg_3``)
    TGS Salt    id,rle_mask                      Carvana: img,rle_mask (order="C")

``kind="instance"`` merges the rows of an image into an int32 label image (row k -> label k);
``kind="semantic"`` paints each row with its ClassId into a uint8 class mask (class 1 without a
ClassId column), or an H x W x C one-hot mask with ``multilabel=True``. Decoding is
:mod:`kseg.rle`'s strict decoder, so a malformed row is reported with its line number.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kseg.codecs import rle
from kseg.core.errors import ConfigError, DataError
from kseg.io.intensity import check_policy
from kseg.io.modality import check_modality
from kseg.io.sample import (
    Sample,
    image_and_annotation,
    list_dsb_ids,
    list_images,
    note,
    preview,
    read_cached,
    read_image,
    resolve_image,
)

ID_COLUMNS = ("ImageId", "id", "img", "Image", "image_id", "ImageId_ClassId")
RLE_COLUMNS = ("EncodedPixels", "rle_mask", "rle", "EncodedPixel")
CLASS_COLUMNS = ("ClassId", "class_id")
EMPTY_RLE = frozenset({"", "nan", "none"})
KINDS = ("instance", "semantic")
UNLISTED = ("empty", "exclude")


@dataclasses.dataclass(frozen=True)
class RleRow:
    """One CSV row: its line in the file (header = line 1), run-length string and class."""

    line: int
    rle: str
    class_id: int


@dataclasses.dataclass(frozen=True)
class RleTable:
    """The CSV grouped by image, ids in order of first appearance; empty rows kept out of
    ``rows`` but their ids listed (an image with no object). ``blank_lines`` holds, per image,
    the lines of empty rows beside rows with a value for the same image and class: a missing
    value rather than "no object", dropped but reported (``Sample.integrity``)."""

    path: Path
    rows: Mapping[str, tuple[RleRow, ...]]
    first_line: Mapping[str, int]
    has_classes: bool
    blank_lines: Mapping[str, tuple[int, ...]] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))


def find_column(columns: Sequence[str], chosen: str | None, candidates: Sequence[str], what: str,
                path: Path, required: bool = True) -> str | None:
    """The column to use: ``chosen`` if given, else the first known name (case-insensitive)."""
    by_lower = {c.strip().lower(): c for c in columns}
    if chosen is not None:
        if chosen in columns:
            return chosen
        if chosen.lower() in by_lower:
            return by_lower[chosen.lower()]
        raise DataError(f"no {what} column {chosen!r}; the columns are {list(columns)}", path)
    for name in candidates:
        if name.lower() in by_lower:
            return by_lower[name.lower()]
    if required:
        raise DataError(f"no {what} column (looked for {', '.join(candidates)}); the columns are "
                        f"{list(columns)}: pass its name as an option", path)
    return None


def read_csv_strings(path: Path) -> pd.DataFrame:
    """Every cell as text, an empty cell as "" (never NaN: "NA" is a valid id, "" means no object)."""
    if not path.is_file():
        raise DataError("CSV file does not exist", path)
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse CSV ({exc})", path) from exc


def read_rle_table(path: str | Path, id_column: str | None = None, rle_column: str | None = None,
                   class_column: str | None = None) -> RleTable:
    """Parse and group the CSV; cached per file size and mtime so each worker parses it once."""
    return read_cached(path, _read_rle_table, id_column, rle_column, class_column, missing="CSV file does not exist")


@functools.lru_cache(maxsize=4)
def _read_rle_table(path: str, size: int, mtime_ns: int, id_column, rle_column, class_column) -> RleTable:
    path = Path(path)
    frame = read_csv_strings(path)
    columns = list(frame.columns)
    id_name = find_column(columns, id_column, ID_COLUMNS, "image id", path)
    rle_name = find_column(columns, rle_column, RLE_COLUMNS, "run-length", path)
    class_name = find_column(columns, class_column, CLASS_COLUMNS, "class", path, required=False)
    ids = frame[id_name].str.strip()
    lines = np.arange(len(frame)) + 2
    classes = None
    if class_name is None and id_name.lower() == "imageid_classid":
        split = ids.str.rsplit("_", n=1, expand=True)
        if split.shape[1] != 2 or split[1].isna().any():
            bad = int(lines[np.flatnonzero(split[1].isna().to_numpy())[0]]) if split.shape[1] == 2 else 2
            raise DataError(f"line {bad}: {id_name} must look like 'image.jpg_3'", path)
        ids, classes = split[0], split[1]
    elif class_name is not None:
        classes = frame[class_name]
    if classes is None:
        class_ids = np.ones(len(frame), np.int64)
    else:
        numbers = pd.to_numeric(classes.str.strip(), errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~np.isfinite(numbers) | (numbers < 1) | (numbers != np.round(numbers)))
        if bad.size:
            raise DataError(
                f"line {lines[bad[0]]}: class {classes.iloc[bad[0]]!r} is not a class number "
                f"(classes count from 1, 0 is background); {bad.size} such row(s)",
                path,
            )
        class_ids = numbers.astype(np.int64)
    blank_ids = np.flatnonzero((ids == "").to_numpy())
    if blank_ids.size:
        raise DataError(f"line {lines[blank_ids[0]]}: empty image id ({blank_ids.size} such row(s))", path)
    encoded = frame[rle_name].str.strip()
    empty = encoded.str.lower().isin(EMPTY_RLE).to_numpy()
    rows: dict[str, list[RleRow]] = {}
    first_line: dict[str, int] = {}
    blanks: dict[str, list[tuple[int, int]]] = {}
    for image_id, line, text, class_id, is_empty in zip(ids.tolist(), lines.tolist(), encoded.tolist(),
                                                        class_ids.tolist(), empty.tolist()):
        first_line.setdefault(image_id, line)
        group = rows.setdefault(image_id, [])
        if not is_empty:
            group.append(RleRow(line, text, class_id))
        else:
            blanks.setdefault(image_id, []).append((line, class_id))
    # An empty row alone (or beside other empty rows) of an image and class means "no object";
    # beside rows with a value for the same image and class it is a missing value.
    blank_lines = {}
    for image_id, empties in blanks.items():
        with_value = {r.class_id for r in rows[image_id]}
        missing = tuple(line for line, class_id in empties if class_id in with_value)
        if missing:
            blank_lines[image_id] = missing
    return RleTable(
        path,
        types.MappingProxyType({k: tuple(v) for k, v in rows.items()}),
        types.MappingProxyType(first_line),
        classes is not None,
        types.MappingProxyType(blank_lines),
    )


class CsvRleReader:
    """Images in ``images_dir`` (flat, or DSB ``<id>/images/<id>.png``), masks as RLE rows.

    Sample ids are the CSV's ImageIds, with or without extension as the CSV writes them.
    ``unlisted`` decides what an image absent from the CSV is: ``"empty"`` (no object, as in
    Severstal, whose CSV lists only images with defects) or ``"exclude"`` (left out).

    Labels completed without an error are noted in ``Sample.integrity``: an image read as empty
    because it has no row (``images_without_rows_empty``) and each empty row dropped beside rows
    with a value for the same image and class (``rle_missing_value_rows_dropped``).
    """

    def __init__(
        self,
        images_dir: str | Path,
        csv_path: str | Path,
        order: str = "F",
        kind: str = "instance",
        unlisted: str = "empty",
        multilabel: bool = False,
        num_classes: int | None = None,
        id_column: str | None = None,
        rle_column: str | None = None,
        class_column: str | None = None,
        intensity: str = "auto",
        modality: str = "keep",
    ):
        if order not in ("F", "C"):
            raise ConfigError(f"order={order!r} must be 'F' (column-major: DSB, TGS, Airbus, Severstal) "
                              "or 'C' (row-major: Carvana)")
        if kind not in KINDS:
            raise ConfigError(f"kind={kind!r} must be one of {KINDS}")
        if unlisted not in UNLISTED:
            raise ConfigError(f"unlisted={unlisted!r} must be one of {UNLISTED}")
        if multilabel and (kind != "semantic" or not num_classes):
            raise ConfigError("multilabel=True gives H x W x C masks: it needs kind='semantic' and num_classes")
        if num_classes is not None and not 1 <= int(num_classes) <= 255:
            raise ConfigError(f"num_classes={num_classes} must be in 1..255 (foreground classes)")
        self.images_dir = Path(images_dir)
        self.csv_path = Path(csv_path)
        self.intensity = check_policy(intensity)
        self.modality = check_modality(modality)
        self.order = order
        self.kind = kind
        self.unlisted = unlisted
        self.multilabel = bool(multilabel)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.id_column = id_column
        self.rle_column = rle_column
        self.class_column = class_column

    @property
    def root(self) -> Path:
        return self.images_dir

    def __repr__(self) -> str:
        return f"CsvRleReader({str(self.images_dir)!r}, {str(self.csv_path)!r}, kind={self.kind!r})"

    def table(self) -> RleTable:
        return read_rle_table(self.csv_path, self.id_column, self.rle_column, self.class_column)

    def _where(self, line: int, image_id: str) -> str:
        """What errors about one row name: the CSV file, the line and the id."""
        return f"{self.csv_path} line {line} (ImageId {image_id!r})"

    def ids(self) -> list[str]:
        """CSV ids in file order, then (``unlisted="empty"``) the folder's other images, sorted.

        Raises when a CSV row names an image that is not in ``images_dir``.
        """
        table = self.table()
        folder = list_images(self.images_dir)
        listed = list(table.first_line)
        paths = [resolve_image(folder, i) for i in listed]
        missing = [i for i, p in zip(listed, paths) if p is None]
        if missing:
            raise DataError(
                f"{len(missing)} ImageId(s) of {self.csv_path.name} have no image in {self.images_dir} "
                f"(looked for the id as a file name, a stem and <id>/images/<id>.png): "
                + preview(f"{i!r} at line {table.first_line[i]}" for i in missing),
                self.csv_path,
            )
        if self.unlisted == "exclude":
            return listed
        used = set(paths)
        with_extension = bool(listed) and listed[0] in folder.by_name
        extra = [(n if with_extension else p.stem) for n, p in folder.by_name.items() if p not in used]
        if not folder.by_name:
            extra = [i for i in list_dsb_ids(self.images_dir) if i not in table.first_line]
        known = set(listed)
        return listed + [i for i in extra if i not in known]

    def image_path(self, sample_id: str) -> Path:
        table = self.table()
        path = resolve_image(list_images(self.images_dir), sample_id)
        if path is None:
            line = table.first_line.get(sample_id)
            where = self._where(line, sample_id) if line else f"{self.csv_path} (ImageId {sample_id!r})"
            raise DataError(f"no image for this id in {self.images_dir} (looked for the id as a file name, "
                            "a stem and <id>/images/<id>.png)", where)
        if sample_id not in table.first_line and self.unlisted == "exclude":
            raise DataError(f"image {sample_id!r} is not listed in {self.csv_path.name} (unlisted='exclude')", path)
        return path

    def source_files(self, sample_id: str) -> list[Path]:
        return image_and_annotation(self.image_path, sample_id, self.csv_path)

    def load(self, sample_id: str) -> Sample:
        table = self.table()
        image_path = self.image_path(sample_id)
        integrity: dict[str, dict] = {}
        image = read_image(image_path, self.intensity, integrity, self.modality)
        shape = image.shape[:2]
        rows = table.rows.get(sample_id, ())
        if sample_id not in table.first_line:
            note(integrity, "images_without_rows_empty", sample_id)
        for line in table.blank_lines.get(sample_id, ()):
            note(integrity, "rle_missing_value_rows_dropped", f"{sample_id} ({self.csv_path.name} line {line})")
        if self.kind == "instance":
            labels = rle.rles_to_labels([r.rle for r in rows], shape, self.order,
                                        row=[self._where(r.line, sample_id) for r in rows])
            labels = np.ascontiguousarray(labels, np.int32)  # "F" decoding gives a column-major view
            return Sample(sample_id, image, labels=labels, path=str(image_path), integrity=integrity)
        return Sample(sample_id, image, mask=self._class_mask(rows, shape, sample_id), path=str(image_path),
                      integrity=integrity)

    def _class_mask(self, rows: Sequence[RleRow], shape: tuple[int, int], sample_id: str) -> np.ndarray:
        """Paint rows by class; two classes on one pixel is an error unless ``multilabel``."""
        for row in rows:
            if self.num_classes is not None and row.class_id > self.num_classes:
                raise DataError(f"class {row.class_id} > num_classes={self.num_classes}",
                                self._where(row.line, sample_id))
        if self.multilabel:
            mask = np.zeros((*shape, self.num_classes), np.uint8)
            for row in rows:
                mask[..., row.class_id - 1] |= rle.decode(row.rle, shape, self.order, row=self._where(row.line, sample_id))
            return mask
        mask = np.zeros(shape, np.uint8)
        owner = np.zeros(shape, np.int32)  # index + 1 of the row that painted each pixel
        for index, row in enumerate(rows, start=1):
            pixels = rle.decode(row.rle, shape, self.order, row=self._where(row.line, sample_id)).astype(bool)
            clash = pixels & (mask != 0) & (mask != row.class_id)
            if clash.any():
                other = rows[int(owner[clash][0]) - 1]
                raise DataError(
                    f"class {row.class_id} overlaps class {other.class_id} of line {other.line} on "
                    f"{int(clash.sum())} pixel(s); pass multilabel=True and num_classes for an "
                    "H x W x C mask",
                    self._where(row.line, sample_id),
                )
            mask[pixels] = row.class_id
            owner[pixels] = index
        return mask
