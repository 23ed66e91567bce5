"""The one value every reader returns, and the image-file helpers readers share."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import types
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import skimage.io

from kseg.core.errors import DataError
from kseg.core.log import get_logger
from kseg.io.intensity import check_policy, to_uint8
from kseg.io.intensity import describe as describe_decoding
from kseg.io.modality import check_modality, to_modality

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp")
MACOS_FOLDER = "__MACOSX"


@dataclasses.dataclass
class Sample:
    """One training or test item.

    ``image`` is uint8 H x W x C as read (C = 1 or 3; alpha dropped). ``labels`` is an int32
    H x W instance label image (0 = background, 1..K instances) for instance datasets, or ``mask`` a
    uint8 H x W class-index mask for semantic ones (H x W x C of 0/1 when classes may overlap);
    test samples have neither.

    ``loss_mask`` (uint8 H x W, 0/1), when given, marks the pixels whose labels are trusted: the
    others get weight 0 in the weight map, so the in-graph loss ignores them (pseudo-labels).

    ``integrity`` records what the reader assumed or repaired in the labels instead of failing,
    ``{kind: {"count": n, "examples": [names], "pixels": n}}`` (``pixels`` only where pixels
    moved); empty when the labels are exactly what the files say. Preprocessing sums it over the
    dataset (see :func:`note` and ``PreprocessedDataset.integrity``).
    """

    id: str
    image: np.ndarray
    labels: np.ndarray | None = None
    mask: np.ndarray | None = None
    path: str | None = None
    integrity: dict[str, dict] = dataclasses.field(default_factory=dict)
    loss_mask: np.ndarray | None = None

    @property
    def target(self) -> np.ndarray | None:
        """The label image if there is one, else the class mask."""
        return self.labels if self.labels is not None else self.mask


def note(integrity: dict[str, dict], kind: str, example: str, pixels: int | None = None) -> None:
    """Count one case of ``kind`` in a ``Sample.integrity`` mapping, named by ``example`` (a file,
    row or id); ``pixels`` adds to the kind's pixel total."""
    entry = integrity.setdefault(kind, {"count": 0, "examples": []})
    entry["count"] += 1
    entry["examples"].append(str(example))
    if pixels is not None:
        entry["pixels"] = entry.get("pixels", 0) + int(pixels)


def _read_any(path: Path, flags: int) -> np.ndarray:
    """cv2.imread for every suffix we accept (cv2 cannot read GIF; PIL via skimage can)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file does not exist", path)
    array = None
    if path.suffix.lower() != ".gif":
        array = cv2.imread(str(path), flags)
    if array is None:
        try:
            array = np.asarray(skimage.io.imread(str(path)))
            frames_first = path.suffix.lower() == ".gif" and array.ndim == 3 and array.shape[-1] not in (3, 4)
            if array.ndim == 4 or frames_first:  # GIF frames (grey: frames x H x W): the first
                array = array[0]
        except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt file
            raise DataError(f"cannot decode image ({exc.__class__.__name__}: {exc})", path) from exc
        if array.ndim == 3 and array.shape[2] in (3, 4) and flags != cv2.IMREAD_GRAYSCALE:
            array = array[..., 2::-1] if array.shape[2] == 3 else array[..., [2, 1, 0, 3]]
    if array is None or array.size == 0:
        raise DataError("cannot decode image (corrupt or unsupported file)", path)
    return array


def check_image(path: str | Path) -> str | None:
    """Why an image file cannot be used (missing, unknown format, truncated or corrupt), or None.

    The header and structure are checked with Pillow (``verify``: cheap, no pixel decoding);
    files Pillow does not know are decoded once with the reader kseg uses.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        return "file does not exist"
    try:
        with Image.open(path) as handle:
            handle.verify()
        return None
    except Exception:  # noqa: BLE001 - decide with the reader kseg uses
        try:
            _read_any(path, cv2.IMREAD_UNCHANGED)
            return None
        except DataError as exc:
            return str(exc).removeprefix(f"{path}: ")


def read_image(path: str | Path, intensity: str = "auto", integrity: dict[str, dict] | None = None,
               modality: str = "keep") -> np.ndarray:
    """Read an image as uint8 H x W x C in RGB order (C = 1 for grayscale, alpha dropped).

    ``intensity`` is the policy that maps other depths to uint8 (:mod:`kseg.io.intensity`),
    ``modality`` what is done to the uint8 image then (:mod:`kseg.io.modality`: ``fluorescence``
    gives one grey channel, objects bright); what they did is noted in ``integrity`` (a
    ``Sample.integrity`` mapping) when one is given.
    """
    array = _read_any(Path(path), cv2.IMREAD_UNCHANGED)
    record = None if integrity is None else functools.partial(note, integrity)
    array = to_uint8(array, intensity, path, record)
    image = array[..., None] if array.ndim == 2 else np.ascontiguousarray(array[..., ::-1])  # OpenCV reads BGR
    return to_modality(image, modality, path, record)


class ImageDecoder:
    """Reads images under one intensity policy and one ``preprocess.modality``, and warns the first
    time each kind of decoding happens (once per dataset, not once per image); ``integrity``
    counts them all."""

    def __init__(self, intensity: str = "auto", modality: str = "keep"):
        self.intensity = check_policy(intensity)
        self.modality = check_modality(modality)
        self.integrity: dict[str, dict] = {}

    def __repr__(self) -> str:  # readers' attributes go into preprocessing cache keys
        if self.modality == "keep":  # as before preprocess.modality existed: caches keep their keys
            return f"ImageDecoder({self.intensity!r})"
        return f"ImageDecoder({self.intensity!r}, {self.modality!r})"

    def read(self, path: str | Path) -> np.ndarray:
        known = set(self.integrity)
        image = read_image(path, self.intensity, self.integrity, self.modality)
        for kind in self.integrity.keys() - known:
            first = self.integrity[kind]["examples"][0]
            get_logger("data").warning(f"warning: {describe_decoding(kind)}, e.g. {first} (said once per dataset)")
        return image


def _read_palette(path: Path) -> np.ndarray | None:
    """Pixel values of a palette PNG/GIF as a viewer means them, or None for other files.

    OpenCV and imageio expand a palette to colours, which destroys class indices (Pascal VOC
    style masks). A grey palette keeps its grey levels (Carvana GIFs read as 0/255); a colour
    palette yields the palette indices, which are the classes.
    """
    if path.suffix.lower() not in (".png", ".gif"):
        return None
    try:
        from PIL import Image

        with Image.open(path) as handle:
            if handle.mode != "P":
                return None
            indices = np.asarray(handle)  # first frame of an animated GIF
            palette = handle.getpalette() or []
    except Exception:  # noqa: BLE001 - let the general reader report undecodable files
        return None
    colours = np.asarray(palette, np.uint8).reshape(-1, 3)
    used = np.unique(indices)
    if used.max(initial=0) >= len(colours):
        return indices.astype(np.uint8)
    grey = colours[used, 0]
    if np.array_equal(colours[used], np.repeat(grey[:, None], 3, axis=1)):
        return colours[:, 0][indices]
    return indices.astype(np.uint8)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask as a uint8 H x W array (first channel if the file has several)."""
    path = Path(path)
    palette_values = _read_palette(path)
    if palette_values is not None:
        return np.ascontiguousarray(palette_values)
    array = _read_any(path, cv2.IMREAD_UNCHANGED)
    if array.ndim == 3:
        array = array[..., 0]
    if array.dtype != np.uint8:
        values = np.unique(array)
        if values[-1] > 255 and (values.size == 1 or (values.size == 2 and values[0] == 0)):
            # A binary mask of a wider type (TGS Salt ships 16-bit PNGs of 0 / 65535, a tile all salt
            # being all 65535): 0 / 255, as an 8-bit binary mask reads.
            array = np.where(array > 0, 255, 0).astype(np.uint8)
        elif values[-1] > 255:
            raise DataError(f"mask values up to {values[-1]} ({values.size} distinct) do not fit uint8 classes "
                            "and are not a binary 0 / max mask", path)
        elif values[0] < 0 or not np.array_equal(values, np.round(values)):
            raise DataError(f"mask values {values[:5].tolist()}... are not whole class indices", path)
        else:
            array = array.astype(np.uint8)
    return np.ascontiguousarray(array)


def check_same_size(image: np.ndarray, mask: np.ndarray, path: str | Path) -> None:
    """Raise a DataError naming ``path`` when a mask and its image differ in height or width."""
    if image.shape[:2] != mask.shape[:2]:
        raise DataError(
            f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{image.shape[1]}x{image.shape[0]} (width x height)",
            path,
        )


def is_listed(name: str) -> bool:
    """A folder entry that belongs to the data: not hidden, not the ``__MACOSX`` folder of resource
    forks that a zip made on macOS carries (``__MACOSX/<id>/images/._<id>.png``)."""
    return not name.startswith(".") and name != MACOS_FOLDER


def is_image_file(name: str) -> bool:
    """An image we can read, not a hidden file (macOS ``._x.png`` forks are not images)."""
    return is_listed(name) and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """The image files directly inside one folder, looked up by file name or by stem.

    ``ambiguous`` holds the stems shared by several files (``x.png`` and ``x.jpg``): looking
    such a stem up is an error, since either file could be meant.
    """

    folder: Path
    by_name: Mapping[str, Path]
    by_stem: Mapping[str, Path]
    ambiguous: Mapping[str, tuple[str, ...]]

    def stem_path(self, stem: str) -> Path | None:
        """The one file whose stem is ``stem``; DataError if two files share it."""
        if stem in self.ambiguous:
            raise DataError(
                f"several files share the name {stem!r} ({', '.join(self.ambiguous[stem])}); "
                "keep one of them or move the others out of the folder",
                self.folder,
            )
        return self.by_stem.get(stem)


def list_images(folder: str | Path) -> ImageFolder:
    """Index the image files in ``folder`` (sorted by name, not recursive).

    The index is cached per folder and folder mtime, so each joblib worker lists a folder with
    200k images once instead of once per sample; adding or removing a file changes the mtime.
    """
    folder = Path(folder)
    try:
        mtime = folder.stat().st_mtime_ns
    except OSError:
        raise DataError("image folder does not exist", folder) from None
    if not folder.is_dir():
        raise DataError("expected a folder of images, found a file", folder)
    if recently_changed(mtime):
        return _list_images.__wrapped__(str(folder), mtime)
    return _list_images(str(folder), mtime)


def image_and_annotation(image_path, sample_id: str, annotation: Path) -> list[Path]:
    """Cache-key files of a sample: its image (``image_path(sample_id)``) and the annotation
    file; the annotation alone when the image cannot be found (never raises)."""
    try:
        return [image_path(sample_id), annotation]
    except DataError:
        return [annotation]


def read_cached(path: str | Path, parse, *args, missing: str = "file does not exist"):
    """``parse(str(path), size, mtime_ns, *args)``, an ``lru_cache``-wrapped parser, so each
    worker parses an annotation file once per version of it (a file changed in the last two
    seconds is parsed afresh, see :func:`recently_changed`)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise DataError(missing, path) from None
    read = parse.__wrapped__ if recently_changed(stat.st_mtime_ns) else parse
    return read(str(path), stat.st_size, stat.st_mtime_ns, *args)


def recently_changed(mtime_ns: int) -> bool:
    """File times tick in clock jiffies, so two changes within one can share an mtime: a folder
    or file changed in the last two seconds is read afresh rather than trusted to a cache."""
    return time.time_ns() - mtime_ns < 2_000_000_000


@functools.lru_cache(maxsize=16)
def _list_images(folder: str, mtime_ns: int) -> ImageFolder:
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if is_image_file(e.name) and e.is_file())
    root = Path(folder)
    by_name = {name: root / name for name in names}
    by_stem: dict[str, Path] = {}
    shared: dict[str, list[str]] = {}
    for name in names:
        stem = os.path.splitext(name)[0]
        if stem in by_stem:
            shared.setdefault(stem, [by_stem[stem].name]).append(name)
        by_stem[stem] = root / name
    ambiguous = {stem: tuple(files) for stem, files in shared.items()}
    return ImageFolder(
        root,
        types.MappingProxyType(by_name),
        types.MappingProxyType(by_stem),
        types.MappingProxyType(ambiguous),
    )


def resolve_image(folder: ImageFolder, image_id: str) -> Path | None:
    """The image file an id names: ``x.jpg`` by file name, ``x`` by stem, or the DSB layout
    ``x/images/x.png`` (Airbus and Severstal ids carry the extension, DSB ids do not)."""
    path = folder.by_name.get(image_id)
    if path is None:
        path = folder.stem_path(image_id)
    if path is None and image_id and "/" not in image_id and image_id not in (".", ".."):
        nested = folder.folder / image_id / "images" / f"{image_id}.png"
        if nested.is_file():
            path = nested
    return path


def list_dsb_ids(folder: str | Path) -> list[str]:
    """Sorted ids of the ``<id>/images/<id>.png`` sample folders directly under ``folder``."""
    folder = Path(folder)
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if is_listed(e.name) and e.is_dir())
    return [n for n in names if (folder / n / "images" / f"{n}.png").is_file()]


def preview(names, limit: int = 5) -> str:
    """``a, b, c and 12 more``: error messages name the first few offenders, not thousands."""
    names = list(names)
    shown = ", ".join(str(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
