"""``kseg predict``: a folder of images -> a folder of PNGs, one per image, named by its file stem.

The images are predicted through the same path as ``make submit`` (:mod:`kseg.submission.make`):
the first run's config picks the task and the submission format, the task checks the format and
the runs, and its ``Submission`` reads and predicts each image. The run's test-time augmentation,
tiling, resize undo and post-processing (a tuned ``postprocess.json`` included) therefore apply
exactly as they do for a submission CSV; several runs are averaged when the family can.

What is written for an image ``<stem>.<ext>``, by what the format's rows hold:

    instances  (rows "instance")      ``<stem>.png``: 16-bit label image, 0 = background, 1..K instances
    mask       (rows "image")         ``<stem>.png``: 8-bit, 0 background / 255 foreground
    classes    (rows "image_class")   ``<stem>.png``: 8-bit class indices (0 = background)
    boxes      (box formats)          ``<stem>.png``: the image with the predicted boxes drawn, and one
                                      ``boxes.csv`` for all images:
                                      image,x_min,y_min,x_max,y_max,score,label (pixel corners, no +1)

With ``probabilities=True`` (families whose submission keeps ``probabilities``: semantic), also
``<stem>_probabilities.png``: channel 0 as grey, or the first three channels as RGB when there are
three or more, scaled from 0..1 to 0..255. Every file is written atomically.

Inputs: image files, and folders whose image files (sorted by name, hidden files skipped, not
recursive) are taken; a folder holding no image files but DSB ``<id>/images/<id>.png`` sample
folders gives those images. :func:`open_prediction` opens the run(s) alone, for predictions kept in
memory.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kseg.core.errors import ConfigError, DataError
from kseg.core.fileio import atomic_path, atomic_write_bytes
from kseg.core.pictures import draw_boxes, unit_to_uint8
from kseg.io.sample import list_dsb_ids, list_images
from kseg.submission.formats import SubmissionFormat
from kseg.submission.make import open_runs
from kseg.tasks.base import Submission

KINDS = {"instance": "instances", "image": "mask", "image_class": "classes", "image_boxes": "boxes"}
BOXES_CSV = "boxes.csv"
BOX_COLUMNS = ("image", "x_min", "y_min", "x_max", "y_max", "score", "label")
PROBABILITIES_SUFFIX = "_probabilities"
MAX_INSTANCES = int(np.iinfo(np.uint16).max)  # labels a 16-bit PNG can hold


@dataclasses.dataclass
class PredictResult:
    output: Path  # the output folder
    written: list[Path]  # every file written: per image its PNG(s), then boxes.csv for box runs
    kind: str  # "instances" | "mask" | "classes" | "boxes"
    runs: list[Path]


def _as_paths(value: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value]


def collect_images(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The image files of ``inputs`` (files and folders, see the module notes), in input order.

    Raises DataError naming the input when a folder holds no image, when a path does not exist,
    and naming both files when two images share a file stem (the outputs are named by stem).
    """
    items = _as_paths(inputs)
    if not items:
        raise DataError("no input images or folders given")
    paths: list[Path] = []
    for item in items:
        if item.is_dir():
            found = list(list_images(item).by_name.values())
            if not found:
                found = [item / i / "images" / f"{i}.png" for i in list_dsb_ids(item)]
            if not found:
                raise DataError("no image files in this folder (nor <id>/images/<id>.png sample folders)", item)
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise DataError("input does not exist", item)
    by_stem: dict[str, Path] = {}
    for path in paths:
        other = by_stem.setdefault(path.stem, path)
        if other != path:
            raise DataError(f"two input images share the file stem {path.stem!r} ({other} and {path}); the "
                            "outputs are named by stem, so rename or leave out one of them", path)
    return paths


def output_kind(fmt: SubmissionFormat) -> str:
    """What the format's rows hold: instances, mask, classes or boxes."""
    return KINDS[fmt.rows]


def encode_png(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` (H x W grey, or H x W x 3 in BGR order) as a PNG, atomically."""
    ok, data = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise DataError("could not encode PNG", path)
    atomic_write_bytes(path, data.tobytes())
    return path


def target_picture(target, image: np.ndarray, kind: str, source: Path) -> np.ndarray:
    """The array written for one image's target (BGR order for the box picture)."""
    if kind == "boxes":
        return draw_boxes(image, None, target)[..., ::-1]
    target = np.asarray(target)
    if target.ndim != 2:
        raise DataError(f"prediction has shape {target.shape}, expected a 2-D {kind} image", source)
    if kind == "instances":
        count = int(target.max(initial=0))
        if count > MAX_INSTANCES:
            raise DataError(f"prediction holds {count} instances; a 16-bit PNG holds at most {MAX_INSTANCES}",
                            source)
        return target.astype(np.uint16)
    if kind == "mask":
        return np.where(target > 0, 255, 0).astype(np.uint8)
    if target.min(initial=0) < 0 or target.max(initial=0) > 255:
        raise DataError(f"class indices {target.min()}..{target.max()} do not fit an 8-bit PNG", source)
    return target.astype(np.uint8)


def probability_picture(probabilities: np.ndarray) -> np.ndarray:
    """uint8 picture of float probabilities: channel 0 grey, or channels 0-2 as RGB (BGR order)."""
    probabilities = np.asarray(probabilities, np.float32)
    if probabilities.ndim == 2:
        probabilities = probabilities[..., None]
    scaled = unit_to_uint8(probabilities)
    return scaled[..., 2::-1] if scaled.shape[2] >= 3 else scaled[..., 0]


def box_table(stem: str, target: dict) -> pd.DataFrame:
    """One image's boxes as rows of ``boxes.csv``."""
    boxes = np.asarray(target["boxes"]).reshape(-1, 4)
    scores = np.asarray(target["scores"]).reshape(-1)
    labels = np.asarray(target.get("labels", np.ones(len(boxes), np.int64))).reshape(-1)
    return pd.DataFrame({"image": [stem] * len(boxes), "x_min": boxes[:, 0], "y_min": boxes[:, 1],
                         "x_max": boxes[:, 2], "y_max": boxes[:, 3], "score": scores, "label": labels},
                        columns=list(BOX_COLUMNS))


def write_box_table(path: Path, tables: Sequence[pd.DataFrame]) -> Path:
    """All images' boxes in one CSV, atomically (the header alone when there is no box)."""
    frame = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(BOX_COLUMNS))
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")
    return path


def _check_outputs(paths: Sequence[Path], output: Path, probabilities: bool) -> None:
    """Refuse to overwrite an input image or to give two outputs the same name."""
    names = {p.stem for p in paths}
    inputs = {p.resolve() for p in paths}
    for path in paths:
        targets = [output / f"{path.stem}.png"]
        if probabilities:
            targets.append(output / f"{path.stem}{PROBABILITIES_SUFFIX}.png")
            if path.stem.endswith(PROBABILITIES_SUFFIX) and path.stem[:-len(PROBABILITIES_SUFFIX)] in names:
                raise DataError(f"input {path.name} has the name of another image's probabilities picture; rename "
                                "it or predict without probabilities", path)
        for target in targets:
            if target.resolve() in inputs:
                raise DataError(f"writing {target.name} into {output} would overwrite an input image; choose "
                                "another output folder", target)


def open_prediction(runs: Sequence[str | os.PathLike], overrides: Sequence[str] = ()) -> tuple[Submission, str]:
    """``(submission, kind)`` of the run(s), opened as ``make submit`` opens them: the first run's
    config picks the task and the format, the task checks both, and each run's checkpoint
    (``predict.checkpoint``) is loaded. ``kind``: instances, mask, classes or boxes."""
    _, fmt, _, submission = open_runs([Path(r) for r in runs], list(overrides))
    return submission, output_kind(fmt)


def predict_images(runs: str | os.PathLike | Sequence[str | os.PathLike],
                   inputs: str | os.PathLike | Iterable[str | os.PathLike],
                   output: str | os.PathLike, *, probabilities: bool = False, overrides: Sequence[str] = (),
                   progress: bool = True) -> PredictResult:
    """Predict every image of ``inputs`` with the run(s) and write one PNG per image into ``output``.

    ``runs``: one run directory, or several (e.g. one per fold) averaged when the family can; the
    first run's config decides format, post-processing and TTA, as for ``make submit``.
    ``overrides``: ``key=value`` settings applied to the run's config (``--set``).
    See the module notes for what each kind of run writes.
    """
    runs = _as_paths(runs)
    if not runs:
        raise ConfigError("no run to predict with")
    overrides = list(overrides)
    paths = collect_images(inputs)
    output = Path(output)
    _check_outputs(paths, output, probabilities)

    submission, kind = open_prediction(runs, overrides)
    if probabilities and not hasattr(submission, "probabilities"):
        raise ConfigError(f"run {runs[0].name} predicts {kind}, with no per-pixel probabilities; predict "
                          "without probabilities")

    output.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    tables: list[pd.DataFrame] = []
    for path in tqdm(paths, desc="predict", unit="img", disable=not progress, file=sys.stderr):
        image = submission.read(path)
        target = submission.predict(image)
        written.append(encode_png(output / f"{path.stem}.png", target_picture(target, image, kind, path)))
        if kind == "boxes":
            tables.append(box_table(path.stem, target))
        if probabilities:
            if submission.probabilities is None:
                raise ConfigError(f"run {runs[0].name} kept no probabilities of {path.name}")
            picture = probability_picture(submission.probabilities)
            written.append(encode_png(output / f"{path.stem}{PROBABILITIES_SUFFIX}.png", picture))
    if kind == "boxes":
        written.append(write_box_table(output / BOXES_CSV, tables))
    return PredictResult(output, written, kind, list(runs))
