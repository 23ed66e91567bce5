"""The reader registry: a layout name from a pipeline YAML -> a dataset reader.

Every reader satisfies :class:`Dataset`: it lists ids without decoding images, loads one sample
on demand and holds only plain attributes, so joblib workers receive it pickled and preprocess
ids in parallel.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Protocol

from kseg.core.errors import ConfigError
from kseg.io.boxes import BOX_LAYOUTS
from kseg.io.csv_rle import CsvRleReader
from kseg.io.dsb import DsbReader
from kseg.io.paired import PairedReader
from kseg.io.sample import Sample


class Dataset(Protocol):
    """What every reader offers (preprocessing, evaluation and notebooks rely on it)."""

    kind: str  # "instance" (Sample.labels), "semantic" (Sample.mask) or "boxes" (load gives a BoxSample)

    def ids(self) -> list[str]: ...

    def load(self, sample_id: str) -> Sample: ...  # raises DataError naming the bad file

    def source_files(self, sample_id: str) -> list[Path]: ...  # for cache keys (path, size, mtime)


# layout -> reader class. Its first argument is the training/images folder; a layout listed in
# MASKS_ROLE takes a second one, what ``dataset.masks`` names for it.
READERS: dict[str, type] = {
    "dsb": DsbReader,
    "paired": PairedReader,
    "csv_rle": CsvRleReader,
}
MASKS_ROLE: dict[str, str] = {
    "paired": "the masks folder (e.g. masks, train_masks)",
    "csv_rle": "the CSV of run-length rows (e.g. train.csv)",
}


def register_reader(layout: str, reader_class: type, masks_role: str | None = None) -> None:
    """Add a layout (e.g. a synthetic or COCO reader) without editing this module."""
    READERS[layout] = reader_class
    if masks_role:
        MASKS_ROLE[layout] = masks_role


# Bounding-box layouts (voc, coco, box_csv): kseg.io.boxes lists them, registered here because that
# module cannot import this one back.
for _layout, (_reader_class, _masks_role) in BOX_LAYOUTS.items():
    register_reader(_layout, _reader_class, _masks_role)


def open_dataset(layout: str, root: str | Path, masks: str | Path | None = None, intensity: str = "auto",
                 modality: str = "keep", **options) -> Dataset:
    """The reader for ``layout`` over ``root`` (training folder or images folder).

    ``masks`` is the masks folder (``paired``) or the RLE CSV (``csv_rle``); ``intensity`` the
    policy images are decoded with (``preprocess.intensity``, see :mod:`kseg.io.intensity`) and
    ``modality`` what is done to them then (``preprocess.modality``, see :mod:`kseg.io.modality`);
    ``options`` are the reader's keyword arguments, checked here so a typo in a YAML names the
    accepted ones.
    """
    if layout not in READERS:
        raise ConfigError(f"unknown dataset layout {layout!r}; known layouts: {', '.join(sorted(READERS))}")
    reader_class = READERS[layout]
    role = MASKS_ROLE.get(layout)
    if role is None and masks is not None:
        raise ConfigError(f"layout {layout!r} takes no dataset.masks (got {masks}); unset it")
    if role is not None and masks is None:
        raise ConfigError(f"layout {layout!r} needs dataset.masks: {role}")
    paths = [Path(root)] if role is None else [Path(root), Path(masks)]
    parameters = list(inspect.signature(reader_class).parameters.values())
    names = {p.name for p in parameters}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    if not takes_any:
        accepted = {p.name for p in parameters[len(paths):]} - {"intensity", "modality"}
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ConfigError(f"layout {layout!r} has no option(s) {unknown}; accepted: {sorted(accepted)}")
    if "intensity" in names or takes_any:
        options["intensity"] = intensity
    elif intensity != "auto":
        raise ConfigError(f"layout {layout!r} decodes its images itself: preprocess.intensity={intensity} cannot "
                          "apply to it; leave it at auto")
    if "modality" in names or (takes_any and modality != "keep"):  # **options readers made before
        options["modality"] = modality  # the key hear of it only when it is set
    elif modality != "keep":
        raise ConfigError(f"layout {layout!r} decodes its images itself: preprocess.modality={modality} cannot "
                          "apply to it; leave it at keep")
    return reader_class(*paths, **options)
