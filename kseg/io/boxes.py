"""Bounding-box annotations for the SSD detector: Pascal VOC XML, COCO JSON, a box CSV, and boxes
derived from any instance-mask dataset.

Why: detection datasets come in three common annotation formats, each with its own box convention
(VOC: 1-based inclusive pixel indices; COCO and the Kaggle CSVs: continuous ``x, y, w, h``). The
detector, its box encoding and :mod:`kseg.metrics.detection` need one convention, and bad boxes
must be reported with the file and the box, not found later as a NaN loss.

Conventions (every reader and helper here):

- Boxes are float32 ``(K, 4)`` arrays in pixel *corner* form ``(x_min, y_min, x_max, y_max)``
  with no +1: a box covering pixel columns 3..7 inclusive has ``x_min = 3, x_max = 8`` (COCO's
  convention, and the one :mod:`kseg.metrics.detection` scores with), so ``w = x_max - x_min``.
- VOC ``<bndbox>`` values are 1-based and inclusive: ``x_min = xmin - 1, y_min = ymin - 1,
  x_max = xmax, y_max = ymax``. COCO / CSV ``[x, y, w, h]``: ``(x, y, x + w, y + h)``.
- Labels are int64 ``1..C``; 0 is background and never an object. ``class_names[0]`` is
  ``"background"``, ``class_names[c]`` names label ``c``.
- ``ignore`` marks VOC ``difficult`` and COCO ``iscrowd`` boxes (matched but not scored).
- A box with a non-positive width or height, or sticking out of the image by more than 1 px, is
  a :class:`DataError` naming the file and the box; a box out by up to 1 px (rounding, or VOC
  files with 0-based values) is clipped to the image. A box left with no area after clipping is an
  error as well.

Readers have ``kind = "boxes"`` and load :class:`BoxSample` values; like the mask readers they
list ids without decoding images and hold only plain attributes (they pickle into joblib
workers). They are registered as layouts ``voc``, ``coco`` and ``box_csv`` by
:mod:`kseg.io.readers` from :data:`BOX_LAYOUTS` at the bottom of this module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from kseg.core.boxes import xywh_to_xyxy
from kseg.core.errors import ConfigError, DataError
from kseg.io.csv_rle import find_column, read_csv_strings
from kseg.io.sample import (
    ImageDecoder,
    Sample,
    image_and_annotation,
    is_listed,
    list_images,
    preview,
    read_cached,
    resolve_image,
)

__all__ = [
    "BOX_LAYOUTS",
    "BoxCsvReader",
    "BoxSample",
    "CocoBoxReader",
    "VocBoxReader",
    "boxes_from_labels",
    "check_boxes",
    "instance_boxes",
]

BACKGROUND = "background"
# Tolerance (pixels) for boxes sticking out of the image: within it they are clipped.
OUTSIDE_TOLERANCE = 1.0


@dataclasses.dataclass
class BoxSample:
    """One detection item: the image (uint8 H x W x C as read, C = 1 or 3) and its boxes.

    ``boxes`` float32 (K, 4) corner form, ``labels`` int64 (K,) in 1..C, ``ignore`` bool (K,).
    """

    id: str
    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray
    path: str | None = None


def _empty_boxes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool)


def _format_box(box) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in box) + "]"


def check_boxes(boxes, image_shape: tuple[int, ...], where: Callable[[int], str]) -> np.ndarray:
    """Validate corner-form boxes against an image of ``image_shape`` (H, W, ...) and clip them.

    ``where(k)`` names box ``k`` in errors (file, line or object). Returns float32 (K, 4).
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    height, width = image_shape[:2]
    bad = np.flatnonzero(~np.isfinite(boxes).all(axis=1))
    if bad.size:
        raise DataError(f"box {_format_box(boxes[bad[0]])} is not finite", where(int(bad[0])))
    bad = np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if bad.size:
        box = boxes[bad[0]]
        raise DataError(
            f"box {_format_box(box)} (x_min, y_min, x_max, y_max) has a non-positive width or height "
            f"({box[2] - box[0]:g} x {box[3] - box[1]:g}); {bad.size} such box(es) in this file",
            where(int(bad[0])),
        )
    tol = OUTSIDE_TOLERANCE
    outside = ((boxes[:, 0] < -tol) | (boxes[:, 1] < -tol) | (boxes[:, 2] > width + tol)
               | (boxes[:, 3] > height + tol))
    clipped = np.clip(boxes, 0.0, [width, height, width, height])
    outside |= (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    bad = np.flatnonzero(outside)
    if bad.size:
        raise DataError(
            f"box {_format_box(boxes[bad[0]])} (x_min, y_min, x_max, y_max) lies outside the "
            f"{width}x{height} image (width x height) by more than {tol:g} px; "
            f"{bad.size} such box(es) in this file",
            where(int(bad[0])),
        )
    return clipped.astype(np.float32)


def boxes_from_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tight boxes of the instances of an integer label image (0 = background).

    Ids need not be consecutive. Returns ``(boxes, instance_ids)``: float32 (K, 4) corner boxes
    (exclusive max, so a one-pixel instance at column 3 gives ``x_min=3, x_max=4``) and int64 (K,)
    ids in increasing order. One pass of :func:`scipy.ndimage.find_objects`.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D label image, got shape {labels.shape}")
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    ids = np.unique(labels)
    if ids.size and ids[0] < 0:
        raise ValueError(f"labels must be >= 0 (0 = background), found {ids[0]}")
    ids = ids[ids > 0].astype(np.int64)
    if ids.size == 0:
        return np.zeros((0, 4), np.float32), ids
    if ids[-1] <= 4 * ids.size + 1024:  # dense enough: find_objects' list is indexed by id
        slices = ndimage.find_objects(labels, max_label=int(ids[-1]))
        slices = [slices[i - 1] for i in ids.tolist()]
    else:  # sparse ids (e.g. 10**9): renumber 1..K first
        dense = np.zeros(labels.shape, np.int32)
        foreground = labels > 0
        dense[foreground] = np.searchsorted(ids, labels[foreground]) + 1
        slices = ndimage.find_objects(dense, max_label=ids.size)
    boxes = np.array([(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in slices], np.float32)
    return boxes, ids


def instance_boxes(sample: Sample) -> BoxSample:
    """The boxes of an instance-mask sample (e.g. DSB): one per instance, label 1, none ignored.

    Boxes are in increasing instance-id order.
    """
    if sample.labels is None:
        raise DataError("sample has no instance label image (a test sample or a semantic dataset)",
                        sample.path or sample.id)
    boxes, _ = boxes_from_labels(sample.labels)
    count = len(boxes)
    return BoxSample(sample.id, sample.image, boxes, np.ones(count, np.int64), np.zeros(count, bool),
                     sample.path)


def _with_background(names, where: str) -> list[str]:
    """``["background", *names]`` (``names`` may already start with it); duplicates are an error."""
    names = [str(n) for n in names]
    if names and names[0] == BACKGROUND:
        names = names[1:]
    if BACKGROUND in names:
        raise ConfigError(f"{where}: {BACKGROUND!r} is class 0 and can only come first")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{where}: duplicate class names {duplicates}")
    return [BACKGROUND, *names]


def _check_size(image: np.ndarray, width, height, where: str) -> None:
    """Annotated width/height (when given, > 0) must be the image's real size."""
    if width and height and (int(width), int(height)) != (image.shape[1], image.shape[0]):
        raise DataError(f"annotation says the image is {int(width)}x{int(height)} but it is "
                        f"{image.shape[1]}x{image.shape[0]} (width x height)", where)


# --- Pascal VOC XML ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _VocObject:
    name: str
    box: tuple  # raw xmin, ymin, xmax, ymax (1-based inclusive) as floats
    difficult: bool


def _voc_number(node, tag: str, where: str) -> float:
    text = node.findtext(tag)
    try:
        return float(text.strip())
    except (AttributeError, ValueError):
        raise DataError(f"<{tag}> is {text!r}, expected a number", where) from None


def _parse_voc(xml_path: Path) -> tuple[str | None, tuple[float, float], list[_VocObject]]:
    """``(filename, (width, height), objects)`` of one VOC XML file (size 0 when absent)."""
    if not xml_path.is_file():
        raise DataError("annotation file does not exist", xml_path)
    try:
        root = ElementTree.parse(xml_path).getroot()
    except ElementTree.ParseError as exc:
        raise DataError(f"cannot parse XML ({exc})", xml_path) from exc
    filename = (root.findtext("filename") or "").strip() or None
    size = root.find("size")
    width = height = 0.0
    if size is not None and size.findtext("width") and size.findtext("height"):
        width = _voc_number(size, "width", f"{xml_path} <size>")
        height = _voc_number(size, "height", f"{xml_path} <size>")
    objects = []
    for index, node in enumerate(root.findall("object"), start=1):
        name = (node.findtext("name") or "").strip()
        where = f"{xml_path} object {index} ({name!r})"
        if not name:
            raise DataError("object has no <name>", where)
        bndbox = node.find("bndbox")
        if bndbox is None:
            raise DataError("object has no <bndbox>", where)
        box = tuple(_voc_number(bndbox, tag, where) for tag in ("xmin", "ymin", "xmax", "ymax"))
        difficult = (node.findtext("difficult") or "0").strip()
        objects.append(_VocObject(name, box, difficult not in ("", "0", "0.0", "false", "False")))
    return filename, (width, height), objects


class VocBoxReader:
    """Images in ``images_dir`` (e.g. JPEGImages) plus one Pascal VOC XML per image.

    Ids are the XML file stems of ``annotations_dir`` (e.g. Annotations), sorted; the image is
    ``<filename>`` of the XML, else the image whose stem is the id. VOC ``<bndbox>`` values are
    1-based inclusive pixel indices, converted to ``(xmin - 1, ymin - 1, xmax, ymax)``.
    ``class_names`` is the given list of object names (``"background"`` is put first), or the
    sorted names found over all the XML files; with a given list an unknown name is an error.
    """

    kind = "boxes"

    def __init__(self, images_dir: str | Path, annotations_dir: str | Path, class_names=None, intensity: str = "auto",
                 modality: str = "keep"):
        self.images_dir = Path(images_dir)
        self.images = ImageDecoder(intensity, modality)
        self.annotations_dir = Path(annotations_dir)
        self._class_names = None if class_names is None else _with_background(class_names, "class_names")

    @property
    def root(self) -> Path:
        return self.images_dir

    def __repr__(self) -> str:
        return f"VocBoxReader({str(self.images_dir)!r}, {str(self.annotations_dir)!r})"

    def ids(self) -> list[str]:
        """Sorted stems of the ``*.xml`` files (nothing is parsed)."""
        if not self.annotations_dir.is_dir():
            raise DataError("VOC annotations folder does not exist (expected e.g. Annotations)",
                            self.annotations_dir)
        with os.scandir(self.annotations_dir) as entries:
            names = sorted(e.name for e in entries if is_listed(e.name) and e.name.lower().endswith(".xml"))
        return [name[:-4] for name in names]

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:  # discovered once per reader (and pickled with it)
            found = {obj.name for i in self.ids() for obj in _parse_voc(self.xml_path(i))[2]}
            self._class_names = _with_background(sorted(found), str(self.annotations_dir))
        return list(self._class_names)

    def xml_path(self, sample_id: str) -> Path:
        return self.annotations_dir / f"{sample_id}.xml"

    def _image_path(self, sample_id: str, filename: str | None) -> Path:
        if filename is not None and (self.images_dir / filename).is_file():
            return self.images_dir / filename
        path = resolve_image(list_images(self.images_dir), sample_id)
        if path is None:
            missing = self.images_dir / (filename or f"{sample_id}.jpg")
            raise DataError(f"image file does not exist (the image of {self.xml_path(sample_id)})", missing)
        return path

    def source_files(self, sample_id: str) -> list[Path]:
        """The image and the XML (cache keys); never raises."""
        xml_path = self.xml_path(sample_id)
        try:
            return [self._image_path(sample_id, _parse_voc(xml_path)[0]), xml_path]
        except DataError:
            return [xml_path]

    def load(self, sample_id: str) -> BoxSample:
        xml_path = self.xml_path(sample_id)
        filename, (width, height), objects = _parse_voc(xml_path)
        image_path = self._image_path(sample_id, filename)
        image = self.images.read(image_path)
        _check_size(image, width, height, f"{xml_path} <size>")
        if not objects:
            return BoxSample(sample_id, image, *_empty_boxes(), path=str(image_path))
        names = self.class_names
        label_of = {name: label for label, name in enumerate(names) if label > 0}
        labels = []
        for index, obj in enumerate(objects, start=1):
            if obj.name not in label_of:
                raise DataError(f"unknown class {obj.name!r}; class_names are {names[1:]}",
                                f"{xml_path} object {index} ({obj.name!r})")
            labels.append(label_of[obj.name])
        raw = np.array([obj.box for obj in objects], np.float64)
        corners = raw - np.array([1.0, 1.0, 0.0, 0.0])  # 1-based inclusive -> 0-based, exclusive max
        boxes = check_boxes(corners, image.shape,
                            lambda k: f"{xml_path} object {k + 1} ({objects[k].name!r}, "
                                      f"VOC bndbox {_format_box(objects[k].box)})")
        return BoxSample(sample_id, image, boxes, np.array(labels, np.int64),
                         np.array([obj.difficult for obj in objects], bool), str(image_path))


# --- COCO JSON ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _CocoImage:
    file_name: str
    width: float
    height: float
    annotation_ids: tuple
    boxes: np.ndarray  # float64 (K, 4) corner form, unchecked
    labels: np.ndarray  # int64 (K,)
    ignore: np.ndarray  # bool (K,)


@dataclasses.dataclass(frozen=True)
class _CocoTable:
    class_names: tuple
    images: Mapping[str, _CocoImage]  # by file stem


def read_coco(path: str | Path) -> _CocoTable:
    """Parse and index a COCO JSON; cached per file size and mtime (each worker parses it once)."""
    return read_cached(path, _read_coco, missing="COCO annotation file does not exist")


@functools.lru_cache(maxsize=2)
def _read_coco(path: str, size: int, mtime_ns: int) -> _CocoTable:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse JSON ({exc})", path) from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise DataError("not a COCO annotation file (needs 'images' and 'categories' lists)", path)
    try:
        categories = sorted(data["categories"], key=lambda c: int(c["id"]))
        category_ids = [int(c["id"]) for c in categories]
        names = [str(c["name"]) for c in categories]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"a category lacks an integer 'id' or a 'name' ({exc!r})", path) from None
    if len(set(category_ids)) != len(category_ids):
        raise DataError("duplicate category ids in 'categories'", path)
    try:
        class_names = tuple(_with_background(names, str(path)))
    except ConfigError as exc:
        raise DataError(str(exc), path) from None
    label_of = {cid: label for label, cid in enumerate(category_ids, start=1)}

    stem_of: dict[int, str] = {}
    entries: dict[str, dict] = {}
    for entry in data["images"]:
        try:
            image_id, file_name = int(entry["id"]), str(entry["file_name"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"an image entry lacks an integer 'id' or a 'file_name': {entry!r:.200}", path) from None
        stem = Path(file_name).stem
        if image_id in stem_of:
            raise DataError(f"image id {image_id} is listed twice in 'images'", path)
        if stem in entries:
            raise DataError(f"two images share the id (file stem) {stem!r}", path)
        stem_of[image_id] = stem
        entries[stem] = {"file_name": file_name, "width": entry.get("width") or 0,
                         "height": entry.get("height") or 0, "rows": []}
    for annotation in data.get("annotations") or []:
        ann_id = annotation.get("id") if isinstance(annotation, dict) else None
        where = f"{path} annotation id {ann_id}"
        try:
            image_id, category_id = int(annotation["image_id"]), int(annotation["category_id"])
        except (KeyError, TypeError, ValueError):
            raise DataError("annotation lacks an integer 'image_id' or 'category_id'", where) from None
        if image_id not in stem_of:
            raise DataError(f"annotation names image_id {image_id}, which is not in 'images'", where)
        if category_id not in label_of:
            raise DataError(f"annotation names category_id {category_id}, which is not in 'categories' "
                            f"(ids {preview(category_ids)})", where)
        bbox = annotation.get("bbox")
        try:
            if not isinstance(bbox, (list, tuple)):
                raise TypeError
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError):
            raise DataError(f"bbox {bbox!r} is not [x, y, width, height]", where) from None
        entries[stem_of[image_id]]["rows"].append(
            (ann_id, tuple(xywh_to_xyxy([[x, y, w, h]])[0].tolist()), label_of[category_id],
             bool(annotation.get("iscrowd", 0))))
    images = {}
    for stem, entry in entries.items():
        rows = entry["rows"]
        images[stem] = _CocoImage(
            entry["file_name"], entry["width"], entry["height"], tuple(r[0] for r in rows),
            np.array([r[1] for r in rows], np.float64).reshape(-1, 4),
            np.array([r[2] for r in rows], np.int64), np.array([r[3] for r in rows], bool))
    return _CocoTable(class_names, types.MappingProxyType(images))


class CocoBoxReader:
    """Images in ``images_dir`` plus one COCO JSON (``images``, ``annotations``, ``categories``).

    Ids are the file stems of the ``images`` entries, sorted. Category ids map to labels 1..C in
    increasing category id (COCO's 1..90 with gaps become 1..80); ``class_names`` are the category
    names. ``bbox [x, y, w, h]`` becomes ``(x, y, x + w, y + h)``; ``iscrowd`` boxes are ignored.
    """

    kind = "boxes"

    def __init__(self, images_dir: str | Path, annotation_json: str | Path, intensity: str = "auto",
                 modality: str = "keep"):
        self.images_dir = Path(images_dir)
        self.images = ImageDecoder(intensity, modality)
        self.annotation_json = Path(annotation_json)

    @property
    def root(self) -> Path:
        return self.images_dir

    def __repr__(self) -> str:
        return f"CocoBoxReader({str(self.images_dir)!r}, {str(self.annotation_json)!r})"

    def table(self) -> _CocoTable:
        return read_coco(self.annotation_json)

    @property
    def class_names(self) -> list[str]:
        return list(self.table().class_names)

    def ids(self) -> list[str]:
        return sorted(self.table().images)

    def image_path(self, sample_id: str) -> Path:
        entry = self.table().images.get(sample_id)
        if entry is None:
            raise DataError(f"no image {sample_id!r} in the COCO 'images' list", self.annotation_json)
        path = self.images_dir / entry.file_name
        if not path.is_file() and (self.images_dir / Path(entry.file_name).name).is_file():
            path = self.images_dir / Path(entry.file_name).name  # file_name with a folder prefix
        return path

    def source_files(self, sample_id: str) -> list[Path]:
        return image_and_annotation(self.image_path, sample_id, self.annotation_json)

    def load(self, sample_id: str) -> BoxSample:
        image_path = self.image_path(sample_id)
        entry = self.table().images[sample_id]
        image = self.images.read(image_path)  # DataError naming the file when it is missing
        _check_size(image, entry.width, entry.height, f"{self.annotation_json} image {entry.file_name!r}")
        boxes = check_boxes(entry.boxes, image.shape,
                            lambda k: f"{self.annotation_json} annotation id {entry.annotation_ids[k]}")
        return BoxSample(sample_id, image, boxes, entry.labels.copy(), entry.ignore.copy(), str(image_path))


# --- CSV of boxes (Kaggle Global Wheat Detection) -----------------------------------------------------

_NUMBER = r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*"
_BBOX_PATTERN = r"^\s*\[" + ",".join([_NUMBER] * 4) + r"\]\s*$"


@dataclasses.dataclass(frozen=True)
class _BoxRows:
    lines: np.ndarray  # int64 (K,) 1-based CSV lines (header = 1)
    boxes: np.ndarray  # float64 (K, 4) corner form, unchecked
    sizes: np.ndarray  # float64 (K, 2) width, height columns (0 when absent)


@dataclasses.dataclass(frozen=True)
class _BoxTable:
    rows: Mapping[str, _BoxRows]


def read_box_csv(path: str | Path) -> _BoxTable:
    """Parse and group a box CSV; cached per file size and mtime."""
    return read_cached(path, _read_box_csv, missing="CSV file does not exist")


@functools.lru_cache(maxsize=2)
def _read_box_csv(path: str, size: int, mtime_ns: int) -> _BoxTable:
    path = Path(path)
    frame = read_csv_strings(path)
    columns = list(frame.columns)
    id_name = find_column(columns, None, ("image_id",), "image id", path)
    bbox_name = find_column(columns, None, ("bbox",), "bbox", path)
    lines = np.arange(len(frame), dtype=np.int64) + 2
    ids = frame[id_name].str.strip()
    blank = np.flatnonzero((ids == "").to_numpy())
    if blank.size:
        raise DataError(f"line {lines[blank[0]]}: empty image_id ({blank.size} such row(s))", path)
    text = frame[bbox_name]
    parts = text.str.extract(_BBOX_PATTERN).astype(float).to_numpy().reshape(-1, 4)
    bad = np.flatnonzero(~np.isfinite(parts).all(axis=1))
    if bad.size:
        raise DataError(f"line {lines[bad[0]]}: bbox {text.iloc[bad[0]]!r} is not '[x, y, width, height]' "
                        f"({bad.size} such row(s))", path)
    boxes = xywh_to_xyxy(parts)
    sizes = np.zeros((len(frame), 2))
    for column, name in enumerate(("width", "height")):
        found = find_column(columns, None, (name,), name, path, required=False)
        if found is None:
            continue
        values = pd.to_numeric(frame[found].str.strip(), errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~np.isfinite(values) | (values <= 0))
        if bad.size:
            raise DataError(f"line {lines[bad[0]]}: {found} {frame[found].iloc[bad[0]]!r} is not a "
                            f"positive number ({bad.size} such row(s))", path)
        sizes[:, column] = values
    groups = frame.groupby(ids, sort=False).indices
    rows = {image_id: _BoxRows(lines[index], boxes[index], sizes[index]) for image_id, index in groups.items()}
    return _BoxTable(types.MappingProxyType(rows))


class BoxCsvReader:
    """Images in ``images_dir`` plus a CSV with one row per box, as Kaggle's Global Wheat Detection:
        image_id,width,height,bbox,source
        b6ab77fd7,1024,1024,"[834.0, 222.0, 56.0, 36.0]",usask_1

    ``bbox`` is ``[x, y, width, height]`` in pixels; every box is class 1 (``class_name``). The
    image of ``image_id`` is ``<image_id><image_suffix>`` (or the image with that stem). Ids are
    the CSV's image ids plus the folder's images that have no row (no object), sorted.
    ``width``/``height`` columns, when present, must be the real image size.
    """

    kind = "boxes"

    def __init__(self, images_dir: str | Path, csv_path: str | Path, image_suffix: str = ".jpg",
                 class_name: str = "object", intensity: str = "auto", modality: str = "keep"):
        self.images_dir = Path(images_dir)
        self.images = ImageDecoder(intensity, modality)
        self.csv_path = Path(csv_path)
        self.image_suffix = str(image_suffix)
        self.class_names = _with_background([class_name], "class_name")

    @property
    def root(self) -> Path:
        return self.images_dir

    def __repr__(self) -> str:
        return f"BoxCsvReader({str(self.images_dir)!r}, {str(self.csv_path)!r})"

    def table(self) -> _BoxTable:
        return read_box_csv(self.csv_path)

    def _find_image(self, folder, image_id: str) -> Path | None:
        path = folder.by_name.get(image_id + self.image_suffix)
        return path if path is not None else resolve_image(folder, image_id)

    def ids(self) -> list[str]:
        """CSV ids and the stems of the folder's other images, sorted; a CSV id without an image
        is an error."""
        table = self.table()
        folder = list_images(self.images_dir)
        missing = [i for i in table.rows if self._find_image(folder, i) is None]
        if missing:
            raise DataError(
                f"{len(missing)} image_id(s) of {self.csv_path.name} have no image in {self.images_dir}: "
                + preview(f"{i!r} at line {table.rows[i].lines[0]}" for i in missing),
                self.csv_path,
            )
        return sorted(set(table.rows) | set(folder.by_stem))

    def image_path(self, sample_id: str) -> Path:
        path = self._find_image(list_images(self.images_dir), sample_id)
        if path is None:
            rows = self.table().rows.get(sample_id)
            where = f" (image_id of {self.csv_path} line {rows.lines[0]})" if rows is not None else ""
            raise DataError(f"image file does not exist{where}", self.images_dir / (sample_id + self.image_suffix))
        return path

    def source_files(self, sample_id: str) -> list[Path]:
        return image_and_annotation(self.image_path, sample_id, self.csv_path)

    def load(self, sample_id: str) -> BoxSample:
        image_path = self.image_path(sample_id)
        image = self.images.read(image_path)
        rows = self.table().rows.get(sample_id)
        if rows is None:
            return BoxSample(sample_id, image, *_empty_boxes(), path=str(image_path))

        def where(k: int) -> str:
            return f"{self.csv_path} line {rows.lines[k]} (image_id {sample_id!r})"

        for k, (width, height) in enumerate(rows.sizes):
            _check_size(image, width, height, where(k))
        boxes = check_boxes(rows.boxes, image.shape, where)
        count = len(boxes)
        return BoxSample(sample_id, image, boxes, np.ones(count, np.int64), np.zeros(count, bool), str(image_path))


# Layout name -> (reader class, what ``dataset.masks`` names for it). kseg.io.readers registers
# these (it imports this module; this module must not import it back).
BOX_LAYOUTS: dict[str, tuple[type, str]] = {
    "voc": (VocBoxReader, "the folder of Pascal VOC XML files (e.g. Annotations)"),
    "coco": (CocoBoxReader, "the COCO annotation JSON (e.g. annotations/instances_train2017.json)"),
    "box_csv": (BoxCsvReader, "the CSV of box rows (e.g. train.csv of Global Wheat Detection)"),
}
