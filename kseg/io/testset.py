"""Which images a submission must cover, and where each one is.

The sample submission, when there is one, is the authority: its ids (in file order) are the rows
Kaggle expects, so each must resolve to an image. Without one, the test folder is listed: DSB
``<id>/images/<id>.png`` folders or a flat folder of images.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kseg.core.errors import ConfigError, DataError
from kseg.io.csv_rle import ID_COLUMNS, find_column, read_csv_strings
from kseg.io.dsb import DsbReader
from kseg.io.sample import list_dsb_ids, list_images, preview, resolve_image

LAYOUTS = ("auto", "dsb", "flat")
ID_STYLES = ("stem", "name")


def discover_test_ids(
    images_root: str | Path | None = None,
    sample_submission: str | Path | None = None,
    layout: str = "auto",
    id_column: str | None = None,
    id_style: str = "stem",
) -> list[tuple[str, Path]]:
    """``(id, image_path)`` for every test image.

    ``layout`` (folder listing only): ``"dsb"``, ``"flat"`` or ``"auto"`` (flat when the folder
    holds image files, else DSB). ``id_style`` (flat folders only): ``"stem"`` gives ``x`` (TGS,
    DSB), ``"name"`` gives ``x.jpg`` (Airbus, Carvana, Severstal).
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r} must be one of {LAYOUTS}")
    if id_style not in ID_STYLES:
        raise ConfigError(f"id_style={id_style!r} must be one of {ID_STYLES}")
    if images_root is None:
        hint = "; the sample submission names the images, the folder holds them" if sample_submission else ""
        raise ConfigError(f"no test images folder given (dataset.test){hint}")
    images_root = Path(images_root)
    if sample_submission is not None:
        return _from_submission(images_root, Path(sample_submission), id_column)
    return _from_folder(images_root, layout, id_style)


def submission_ids(path: Path, id_column: str | None = None) -> list[str]:
    """Unique image ids of a sample submission, in file order (``x.jpg_1`` rows give ``x.jpg``)."""
    frame = read_csv_strings(path)
    if frame.empty:
        raise DataError("sample submission has no rows", path)
    column = find_column(list(frame.columns), id_column, ID_COLUMNS, "image id", path, required=False)
    column = column or frame.columns[0]
    ids = frame[column].str.strip()
    if column.lower() == "imageid_classid":
        ids = ids.str.rsplit("_", n=1).str[0]
    return list(pd.unique(ids))


def _from_submission(images_root: Path, csv_path: Path, id_column: str | None) -> list[tuple[str, Path]]:
    ids = submission_ids(csv_path, id_column)
    folder = list_images(images_root)
    found = [(i, resolve_image(folder, i)) for i in ids]
    missing = [i for i, path in found if path is None]
    if missing:
        raise DataError(
            f"{len(missing)} id(s) of sample submission {csv_path.name} have no image in {images_root} "
            f"(looked for <id>, <id>.<ext> and <id>/images/<id>.png): {preview(repr(i) for i in missing)}",
            csv_path,
        )
    return found


def _from_folder(images_root: Path, layout: str, id_style: str) -> list[tuple[str, Path]]:
    folder = list_images(images_root)
    if layout == "auto":
        layout = "flat" if folder.by_name else "dsb"
    if layout == "flat":
        if id_style == "name":
            pairs = list(folder.by_name.items())
        else:
            pairs = [(stem, folder.stem_path(stem)) for stem in folder.by_stem]
        if not pairs:
            raise DataError("no image files in the test folder (for <id>/images/<id>.png use layout='dsb')",
                            images_root)
        return pairs
    reader = DsbReader(images_root)
    ids = reader.ids()
    if not ids:
        raise DataError("no test sample folders <id>/images/<id>.png in this folder", images_root)
    if len(list_dsb_ids(images_root)) == len(ids):
        return [(i, images_root / i / "images" / f"{i}.png") for i in ids]
    return [(i, reader.image_path(i)) for i in ids]  # names the first folder without its image
