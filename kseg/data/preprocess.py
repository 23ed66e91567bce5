"""Parallel preprocessing with an on-disk cache: decode, merge, resize or pad, weight maps.

Each sample is processed by a joblib worker that writes its own ``.npz`` file into a cache folder
named by a hash of the data (files, sizes, mtimes) and of the preprocessing settings, so

- a second run with the same settings only reads the cache,
- a changed setting or a changed file gives a new folder (a rebuild),
- an interrupted run resumes: finished samples are kept (each file is written atomically) and the
  manifest that marks the folder complete is written last,
- a failed run (a bad file under ``on_error="raise"``, a full disk) removes the folder it was
  filling, unless another job is filling it too, so no manifest-less folder is left for nothing,
- workers return only a few bytes (id and error), never arrays, so parallelism pays off.

Bad inputs are never dropped silently: ``on_error="raise"`` stops at the first one with its file
name, ``on_error="skip"`` leaves it out and reports every skipped file at the end.

Labels a reader completed or repaired without an error (``Sample.integrity``: an RLE row without
a value, an image without rows, an empty masks folder, overlaps resolved by ``overlap="first"``)
are summed into ``PreprocessedDataset.integrity``, ``{kind: {"count": n, "examples": [first
few names], "pixels": n}}``, kept in the manifest (each sample's notes also travel in its
``.npz``, so a resumed run counts finished samples too) and logged as one warning per run.
``strict_labels=True`` makes each such case an error instead, except the kinds a reader option
asked for explicitly (``LENIENT_KINDS``), which are still counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import cv2
import joblib
import numpy as np
from tqdm.auto import tqdm

from kseg.core.config import project_path
from kseg.core.errors import ConfigError, DataError
from kseg.core.fileio import atomic_save_npz, atomic_write_text
from kseg.core.log import get_logger
from kseg.data.weights import class_balance_map, unet_weight_map
from kseg.io.intensity import DECODE_KINDS, check_policy
from kseg.io.modality import check_modality
from kseg.io.sample import Sample, preview

CACHE_VERSION = 1
MANIFEST = "manifest.json"
FILLING = ".filling.lock"  # held shared by every job filling a cache folder (see _filling)
MODES = ("none", "resize", "pad")
WEIGHT_MAPS = ("unet", "balance", "none")
# Settings that change how the work is done but not what is written: kept out of the cache key.
NON_OUTPUT_SETTINGS = ("n_jobs", "backend", "on_error", "cache_dir", "progress")
# Settings added after caches were written, at the value that writes what those caches hold: left
# out of the key (of the settings and of the reader's attributes) at that value, so they stay valid.
KEY_DEFAULTS = {"modality": "keep"}
# Sample.integrity kinds the readers note, as the summary warning words them.
INTEGRITY_KINDS = {
    "rle_missing_value_rows_dropped": "CSV row(s) without a run-length value dropped beside rows "
                                      "with a value for the same image (and class)",
    "images_without_rows_empty": "image(s) without a CSV row read as having no object (unlisted='empty')",
    "empty_mask_folders": "empty masks folder(s) read as a sample without objects",
    "overlaps_resolved_first": "overlapping instance mask(s) resolved by overlap='first'",
    **DECODE_KINDS,  # what preprocess.intensity did to images: reported apart from the labels
}
# Kinds an explicit setting asked for: counted, but not an error under strict_labels.
LENIENT_KINDS = ("overlaps_resolved_first", *DECODE_KINDS)
INTEGRITY_EXAMPLES = 5  # names kept per kind in the summary
NOTES_KEY = "integrity"  # the sample's notes (JSON text) inside its .npz


class Reader(Protocol):
    """What preprocessing needs from a dataset reader (see :mod:`kseg.io.readers`)."""

    kind: str

    def ids(self) -> list[str]: ...

    def load(self, sample_id: str) -> Sample: ...

    def source_files(self, sample_id: str) -> list[Path]: ...


@dataclasses.dataclass(frozen=True)
class PreprocessSettings:
    """What each sample goes through. Defaults match ``pipelines/_base.yaml``."""

    mode: str = "none"  # none: native size; resize: to ``size``; pad: up to at least ``size``
    size: tuple[int, int] | None = None  # (height, width)
    channels: int = 3
    weight_map: str = "unet"
    class_weights: str = "balanced"  # balanced: inverse class frequency per image | none: 1 for every class
    w0: float = 10.0
    sigma: float = 5.0
    n_jobs: int = 2
    backend: str = "loky"
    on_error: str = "raise"
    cache_dir: str = "cache"
    progress: bool = True
    strict_labels: bool = False  # a label a reader completed or repaired is an error, not a count
    intensity: str = "auto"  # how the reader decodes images to uint8 (kseg.io.intensity); part of the cache key
    modality: str = "keep"  # what the reader does to them then (kseg.io.modality); part of the cache key

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"preprocess.mode {self.mode!r} is not one of {MODES}")
        if self.mode != "none" and not self.size:
            raise ConfigError(f"preprocess.mode={self.mode} needs preprocess.size: [height, width]")
        if self.weight_map not in WEIGHT_MAPS:
            raise ConfigError(f"preprocess.weight_map {self.weight_map!r} is not one of {WEIGHT_MAPS}")
        if self.class_weights not in ("balanced", "none"):
            raise ConfigError(f"preprocess.class_weights {self.class_weights!r} must be 'balanced' or 'none'")
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"preprocess.on_error {self.on_error!r} must be 'raise' or 'skip'")
        if not isinstance(self.strict_labels, bool):
            raise ConfigError(f"preprocess.strict_labels must be true or false, not {self.strict_labels!r}")
        check_policy(self.intensity)
        check_modality(self.modality)
        if self.channels not in (1, 3):
            raise ConfigError(f"preprocess.channels must be 1 or 3, not {self.channels}")
        if self.size is not None:
            object.__setattr__(self, "size", tuple(int(v) for v in self.size))

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> PreprocessSettings:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(section) - fields
        if unknown:
            raise ConfigError(f"unknown preprocess settings {sorted(unknown)}; known: {sorted(fields)}")
        return cls(**dict(section))

    def output_key(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in NON_OUTPUT_SETTINGS:
            data.pop(name)
        for name, value in KEY_DEFAULTS.items():
            if data[name] == value:
                data.pop(name)
        # strict_labels changes the output only when it leaves samples out (on_error=skip): with
        # on_error=raise a strict run either stops or writes what a lenient one writes, and a
        # lenient cache's summary is checked on a hit. So caches keep their keys.
        if not (self.strict_labels and self.on_error == "skip"):
            data.pop("strict_labels")
        return data


@dataclasses.dataclass
class PreprocessedDataset:
    """A complete cache folder: one ``<index>.npz`` per sample holding ``image``, ``target``, ``weight``.

    ``integrity`` sums what the reader completed or repaired in the kept samples' labels,
    ``{kind: {"count": n, "examples": [first few names], "pixels": n}}`` (plain JSON, empty
    when every label is as its files say; see ``INTEGRITY_KINDS``).
    """

    directory: Path
    ids: list[str]
    kind: str
    skipped: dict[str, str]
    integrity: dict[str, dict] = dataclasses.field(default_factory=dict)

    def path(self, sample_id: str) -> Path:
        return self.directory / _file_name(sample_id)

    def load(self, sample_id: str) -> dict[str, np.ndarray]:
        with np.load(self.path(sample_id)) as data:
            return {key: data[key] for key in data.files if key != NOTES_KEY}

    def notes(self, sample_id: str) -> dict[str, dict]:
        """What the reader noted about the sample (``Sample.integrity``, a few examples per kind),
        e.g. that ``preprocess.modality`` inverted its image; {} for caches written before notes."""
        kept = _cached_notes(self.path(sample_id))
        return kept[0] if kept else {}

    def __len__(self) -> int:
        return len(self.ids)


def _file_name(sample_id: str) -> str:
    # ids can hold characters that are not safe in file names (Airbus 'x.jpg', nested paths).
    digest = hashlib.sha1(sample_id.encode()).hexdigest()[:16]
    return f"{digest}.npz"


def cache_key(reader: Reader, settings: PreprocessSettings, ids: list[str]) -> str:
    """Hash of the reader's identity, every source file's (path, size, mtime) and the settings."""
    digest = hashlib.sha256()
    identity = {
        "version": CACHE_VERSION,
        "reader": type(reader).__qualname__,
        "reader_args": {k: str(v) for k, v in sorted(vars(reader).items())
                        if not k.startswith("_") and not (k in KEY_DEFAULTS and v == KEY_DEFAULTS[k])},
        "settings": settings.output_key(),
    }
    digest.update(json.dumps(identity, sort_keys=True).encode())
    for sample_id in ids:
        digest.update(sample_id.encode() + b"\0")
        for path in reader.source_files(sample_id):
            try:
                stat = Path(path).stat()
                digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
            except OSError:
                digest.update(f"{path}\0missing\0".encode())
    return digest.hexdigest()[:20]


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Give every image the same channel count (grey -> repeated RGB, RGB -> luma)."""
    if image.shape[2] == channels:
        return image
    if channels == 3:
        return np.repeat(image[..., :1], 3, axis=2)
    return cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)[..., None]


def resize_sample(image: np.ndarray, target: np.ndarray | None, size: tuple[int, int]):
    """Resize to (height, width): area/linear for the image, nearest for labels and masks."""
    height, width = size
    shrinking = height * width < image.shape[0] * image.shape[1]
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    if image.ndim == 2:
        image = image[..., None]
    if target is not None:
        # cv2 cannot resize int32; float32 holds label ids exactly up to 2**24.
        resized = cv2.resize(target.astype(np.float32), (width, height), interpolation=cv2.INTER_NEAREST)
        target = resized.astype(target.dtype)
    return image, target


def pad_amounts(height: int, width: int, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric padding that brings (height, width) up to at least ``size``."""
    extra_h = max(0, size[0] - height)
    extra_w = max(0, size[1] - width)
    return (extra_h // 2, extra_h - extra_h // 2), (extra_w // 2, extra_w - extra_w // 2)


def process_sample(sample: Sample, settings: PreprocessSettings) -> dict[str, np.ndarray]:
    """The per-sample work: channels, size, weight map. Pure function of the sample."""

    image = to_channels(sample.image, settings.channels)
    target = sample.target
    if target is not None:
        target = target.astype(np.int32 if sample.labels is not None else np.uint8)
    valid = None if getattr(sample, "loss_mask", None) is None else (np.asarray(sample.loss_mask) > 0)
    if settings.mode == "resize":
        if valid is not None:
            height, width = settings.size
            valid = cv2.resize(valid.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
        image, target = resize_sample(image, target, settings.size)
    elif settings.mode == "pad":
        pads = pad_amounts(image.shape[0], image.shape[1], settings.size)
        valid = np.pad(np.ones(image.shape[:2], bool) if valid is None else valid, pads)
        image = np.pad(image, (*pads, (0, 0)), mode="reflect" if min(image.shape[:2]) > 1 else "edge")
        if target is not None:
            target = np.pad(target, pads)
    arrays = {"image": np.ascontiguousarray(image)}
    if target is None:
        return arrays
    arrays["target"] = np.ascontiguousarray(target)
    class_weights = None if settings.class_weights == "none" else settings.class_weights
    if settings.weight_map == "none":
        weight = np.ones(target.shape, np.float32)
    elif settings.weight_map == "balance" or sample.labels is None and target.max() > 1:
        weight = class_balance_map(target, class_weights)
    elif sample.labels is not None:
        weight = unet_weight_map(target, w0=settings.w0, sigma=settings.sigma, class_weights=class_weights)
    else:
        # Binary semantic masks (e.g. cells between membranes): the border term separates the
        # connected foreground regions, as in the U-Net paper's EM experiments.
        regions = cv2.connectedComponents(target.astype(np.uint8), connectivity=4)[1]
        weight = unet_weight_map(regions.astype(np.int32), w0=settings.w0, sigma=settings.sigma,
                                 class_weights=class_weights)
    if valid is not None:
        weight = weight * valid  # padded pixels and untrusted (pseudo-)labels carry no loss
    arrays["weight"] = weight.astype(np.float32)
    return arrays


def _work(reader: Reader, sample_id: str, out_path: Path,
          settings: PreprocessSettings) -> tuple[str, str | None, dict[str, dict]]:
    """Run in a worker: process one sample into its cache file; report an error as text, and
    the sample's label notes (``Sample.integrity``, a few examples per kind)."""
    cached = _cached_notes(out_path) if out_path.exists() else None
    try:
        if cached is not None:
            notes, where = cached
        else:  # not processed yet, or written before notes were kept: read the sample (again) for them
            sample = reader.load(sample_id)
            notes, where = _sample_notes(sample), sample.path
            if not out_path.exists():
                arrays = process_sample(sample, settings)
                arrays[NOTES_KEY] = np.array(json.dumps({"path": where, "notes": notes}))
                atomic_save_npz(out_path, **arrays)
    except DataError as exc:
        return sample_id, str(exc), {}
    error = _strict_error(notes, where or sample_id) if settings.strict_labels else None
    return sample_id, error, notes


def _sample_notes(sample) -> dict[str, dict]:
    """``sample.integrity`` as plain JSON values, each kind's examples cut to a few."""
    notes = {}
    for kind, entry in (getattr(sample, "integrity", None) or {}).items():
        notes[kind] = {"count": int(entry["count"]),
                       "examples": [str(e) for e in entry["examples"][:INTEGRITY_EXAMPLES]]}
        if "pixels" in entry:
            notes[kind]["pixels"] = int(entry["pixels"])
    return notes


def _cached_notes(path: Path) -> tuple[dict[str, dict], str | None] | None:
    """(notes, image path) kept in a finished sample's ``.npz``; None when it has none."""
    try:
        with np.load(path) as data:
            if NOTES_KEY not in data.files:
                return None
            kept = json.loads(str(data[NOTES_KEY]))
    except (OSError, ValueError):
        return None
    return kept["notes"], kept["path"]


def summarize_integrity(notes: Mapping[str, Mapping[str, dict]], ids: list[str]) -> dict[str, dict]:
    """Per-sample notes summed in ``ids`` order: ``{kind: {"count", "examples", "pixels"}}``."""
    summary: dict[str, dict] = {}
    for sample_id in ids:
        for kind, entry in notes.get(sample_id, {}).items():
            total = summary.setdefault(kind, {"count": 0, "examples": []})
            total["count"] += int(entry["count"])
            room = max(INTEGRITY_EXAMPLES - len(total["examples"]), 0)
            total["examples"].extend(entry["examples"][:room])
            if "pixels" in entry:
                total["pixels"] = total.get("pixels", 0) + int(entry["pixels"])
    return summary


def describe_integrity(kind: str, entry: Mapping[str, Any]) -> str:
    """One summary entry in words, naming its first few examples."""
    text = f"{entry['count']} {INTEGRITY_KINDS.get(kind, kind)}"
    if "pixels" in entry:
        text += f", {entry['pixels']} pixel(s) left to the earlier mask"
    examples = list(entry["examples"])
    shown = preview(examples)
    if entry["count"] > len(examples):
        shown += f" and {entry['count'] - len(examples)} more"
    return f"{text}: {shown}"


def _strict_error(notes: Mapping[str, dict], where: object) -> str | None:
    """The error ``strict_labels`` makes of a sample's notes (lenient kinds aside), or None."""
    refused = [describe_integrity(k, e) for k, e in notes.items() if k not in LENIENT_KINDS]
    if not refused:
        return None
    return str(DataError("; ".join(refused) + " (preprocess.strict_labels is true: fix the labels, "
                         "or set it to false to accept them and count them)", where))


def preprocess(reader: Reader, settings: PreprocessSettings, ids: list[str] | None = None) -> PreprocessedDataset:
    """Preprocess ``ids`` (default: all) of ``reader`` into the cache, or read the cache."""

    decoding = getattr(reader, "intensity", settings.intensity)
    if decoding != settings.intensity:
        raise ConfigError(f"the reader decodes images with intensity={decoding!r} but preprocess.intensity is "
                          f"{settings.intensity!r}: open it with open_dataset(..., intensity={settings.intensity!r})")
    converting = getattr(reader, "modality", settings.modality)
    if converting != settings.modality:
        raise ConfigError(f"the reader converts images with modality={converting!r} but preprocess.modality is "
                          f"{settings.modality!r}: open it with open_dataset(..., modality={settings.modality!r})")
    ids = list(reader.ids() if ids is None else ids)
    if not ids:
        raise DataError("dataset has no samples", getattr(reader, "root", None))
    key = cache_key(reader, settings, ids)
    directory = project_path(settings.cache_dir) / key
    manifest_path = directory / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        skipped = manifest["skipped"]
        if "integrity" not in manifest:  # written before label notes were kept: count them once
            kept = [i for i in ids if i not in skipped]
            more, notes = _run_workers(reader, settings, kept, directory)
            skipped.update(more)
            manifest["integrity"] = summarize_integrity(notes, [i for i in kept if i not in skipped])
            atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    else:
        with _filling(directory):
            skipped, notes = _run_workers(reader, settings, ids, directory)
            manifest = {"version": CACHE_VERSION, "kind": reader.kind, "ids": ids, "skipped": skipped,
                        "settings": settings.output_key(),
                        "integrity": summarize_integrity(notes, [i for i in ids if i not in skipped])}
            atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    integrity = manifest["integrity"]
    if skipped and settings.on_error == "raise":
        first = next(iter(skipped.values()))
        raise DataError(f"{len(skipped)} bad sample(s); first: {first} (set preprocess.on_error=skip to leave them out)")
    refused = {k: e for k, e in integrity.items() if k not in LENIENT_KINDS}
    if settings.strict_labels and refused:  # a cache written by a lenient run
        raise DataError("preprocess.strict_labels is true and the labels were read with "
                        + "; ".join(describe_integrity(k, e) for k, e in refused.items())
                        + " (fix the labels, or set preprocess.strict_labels to false to accept and count them)")
    if skipped:
        _report_skipped(skipped)
    if integrity:
        _report_integrity(integrity, settings.intensity, settings.modality)
    kept = [i for i in ids if i not in skipped]
    return PreprocessedDataset(directory=directory, ids=kept, kind=manifest["kind"], skipped=skipped,
                               integrity=integrity)


@contextlib.contextmanager
def _dask_client(backend: str) -> Iterator[None]:
    """For ``backend="dask"``: the caller's ``dask.distributed`` client, else one for this run --
    connected to the scheduler dask's configuration names (``DASK_SCHEDULER_ADDRESS``), or to a
    local cluster when it names none -- so the command line needs no Python to use a cluster."""
    if backend != "dask":
        yield
        return
    try:
        from distributed import Client, get_client
    except ImportError as exc:
        raise ConfigError("preprocess.backend=dask needs dask.distributed: pip install 'kseg[dask]'") from exc
    try:
        get_client()
    except ValueError:  # no client in this process
        with Client() as client:
            get_logger("data").info(f"preprocess: dask scheduler {client.scheduler.address}")
            yield
        return
    yield


@contextlib.contextmanager
def _filling(directory: Path) -> Iterator[None]:
    """Fill a cache folder; if filling fails (bad input, a bug, a full disk) remove what was
    written, unless another job is filling the same folder.

    Every filler holds ``FILLING`` shared (``flock``, released by the kernel however the process
    ends); the failed one deletes the folder only when it can take the lock exclusively. A
    *killed* filler cannot clean up, and need not: its finished samples are what a rerun with the
    same key resumes from. A failed one's would only be picked up by a rerun with the same inputs,
    which fails again, so without this they would stay on disk for nothing.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / FILLING, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    except Exception:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another job is filling this folder: its samples are good, leave them
        else:
            shutil.rmtree(directory, ignore_errors=True)
            get_logger("data").info(f"preprocess: removed the unfinished cache folder {directory}")
        raise
    finally:
        os.close(fd)


def _run_workers(reader: Reader, settings: PreprocessSettings, ids: list[str],
                 directory: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """(error of each skipped sample, label notes of each sample that has some)."""
    tasks = (joblib.delayed(_work)(reader, i, directory / _file_name(i), settings) for i in ids)
    skipped: dict[str, str] = {}
    notes: dict[str, dict] = {}
    with _dask_client(settings.backend), joblib.parallel_config(backend=settings.backend, n_jobs=settings.n_jobs):
        results = joblib.Parallel(return_as="generator_unordered")(tasks)
        for sample_id, error, sample_notes in tqdm(results, total=len(ids), desc="preprocess", unit="img",
                                                   disable=not settings.progress, file=sys.stderr):
            if sample_notes:
                notes[sample_id] = sample_notes
            if error is None:
                continue
            if settings.on_error == "raise":
                raise DataError(error)
            skipped[sample_id] = error
    return skipped, notes


def _report_skipped(skipped: dict[str, str]) -> None:
    log = get_logger("data")
    log.warning(f"preprocess: skipped {len(skipped)} bad sample(s):")
    for message in skipped.values():
        log.warning(f"  - {message}")


def split_integrity(integrity: Mapping[str, Any]) -> tuple[dict, dict]:
    """(label notes, image decoding notes) of an integrity summary."""
    labels = {k: v for k, v in integrity.items() if k not in DECODE_KINDS}
    return labels, {k: v for k, v in integrity.items() if k in DECODE_KINDS}


def _report_integrity(integrity: Mapping[str, Mapping[str, Any]], intensity: str, modality: str = "keep") -> None:
    """One warning listing each kind of label a reader completed or repaired, with its count, and
    one for what the intensity policy (and ``preprocess.modality``) did to the images."""
    labels, images = split_integrity(integrity)
    log = get_logger("data")
    if images:
        lines = [f"  - {kind}: {describe_integrity(kind, entry)}" for kind, entry in images.items()]
        also = "" if modality == "keep" else f" and preprocess.modality={modality}"
        log.warning(f"preprocess: images decoded to uint8 under preprocess.intensity={intensity}{also} "
                    "(see the README's intensity policy):\n" + "\n".join(lines))
    if labels:
        lines = [f"  - {kind}: {describe_integrity(kind, entry)}" for kind, entry in labels.items()]
        log.warning("preprocess: labels read with repairs or assumptions (preprocess.strict_labels: true refuses "
                    "them, an explicit overlap='first' excepted):\n" + "\n".join(lines))
