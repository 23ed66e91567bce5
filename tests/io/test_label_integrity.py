"""Labels a reader completes or repairs without failing are counted, named and cached.

Each case is written as real files (CSV rows, image and mask PNGs): a blank run-length value among
an image's rows, an image without CSV rows, an empty ``masks/`` folder and overlapping masks
resolved by ``overlap="first"``. Readers note each case on the Sample, preprocessing sums the
notes into ``PreprocessedDataset.integrity`` (kept in the cache manifest) and logs them once;
``strict_labels`` turns every case but an explicit ``overlap="first"`` into an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures_datasets import (
    imwrite,
    same_partition,
    write_csv_rle_dataset,
    write_dsb_dataset,
)

from kseg.codecs.rle import encode
from kseg.core.errors import DataError
from kseg.data.preprocess import MANIFEST, PreprocessSettings, preprocess
from kseg.io.csv_rle import CsvRleReader
from kseg.io.dsb import DsbReader
from kseg.io.sample import read_mask

HEADER = "preprocess: labels read with"


def settings(tmp_path, **kw):
    kw.setdefault("n_jobs", 1)
    return PreprocessSettings(cache_dir=str(tmp_path / "cache"), progress=False, **kw)


def mask_files(root: Path, sample_id: str) -> list[Path]:
    return sorted((root / sample_id / "masks").glob("*.png"))


def airbus_with_blank_rows(tmp_path):
    """Airbus-style CSV; a blank and a 'NaN' value among the rows of the first two images."""
    truth = write_csv_rle_dataset(tmp_path / "images", tmp_path / "train.csv", n=4, empty_images=1)
    ids = list(truth)
    lines = (tmp_path / "train.csv").read_text().splitlines()
    # header, 3 rows of ids[0], 3 of ids[1], 3 of ids[2], 1 empty row of ids[3] (a real "no ship")
    lines.insert(2, f"{ids[0]},")          # becomes line 3
    lines.insert(6, f"{ids[1]},NaN")       # becomes line 7
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    return truth, ids


# --- (1) a missing run-length value among an image's rows ----------------------------------------


def test_blank_rle_value_beside_other_rows_is_noted_by_the_reader(tmp_path):
    truth, ids = airbus_with_blank_rows(tmp_path)
    reader = CsvRleReader(tmp_path / "images", tmp_path / "train.csv")
    first = reader.load(ids[0])
    assert same_partition(first.labels, truth[ids[0]][1])  # the labels the other rows give
    assert first.integrity == {"rle_missing_value_rows_dropped":
                               {"count": 1, "examples": [f"{ids[0]} (train.csv line 3)"]}}
    assert reader.load(ids[1]).integrity["rle_missing_value_rows_dropped"]["examples"] == [
        f"{ids[1]} (train.csv line 7)"]
    assert reader.load(ids[2]).integrity == {}
    assert reader.load(ids[3]).integrity == {}  # a single empty row is "no object", as the CSV says


def test_blank_rle_rows_are_counted_by_preprocessing(tmp_path, capsys):
    _, ids = airbus_with_blank_rows(tmp_path)
    reader = CsvRleReader(tmp_path / "images", tmp_path / "train.csv")
    data = preprocess(reader, settings(tmp_path, n_jobs=2))
    assert data.integrity == {"rle_missing_value_rows_dropped": {
        "count": 2, "examples": [f"{ids[0]} (train.csv line 3)", f"{ids[1]} (train.csv line 7)"]}}
    err = capsys.readouterr().err
    assert err.count(HEADER) == 1 and "rle_missing_value_rows_dropped: 2 " in err and ids[1] in err


def test_blank_rows_of_absent_classes_are_not_counted(tmp_path):
    """Old Severstal CSVs hold one row per image and class; absent classes are blank rows."""
    truth = write_csv_rle_dataset(tmp_path / "images", tmp_path / "train.csv", n=1, severstal=True,
                                  empty_images=0)
    image_id, (_, classes) = next(iter(truth.items()))
    rows = ["ImageId_ClassId,EncodedPixels"] + [f"{image_id}_{c},{encode(classes == c)}" for c in range(1, 5)]
    assert any(row.endswith(",") for row in rows)  # at least one class is absent
    (tmp_path / "old.csv").write_text("\n".join(rows) + "\n")
    reader = CsvRleReader(tmp_path / "images", tmp_path / "old.csv", kind="semantic")
    assert reader.load(image_id).integrity == {}
    present = int(classes.max())
    (tmp_path / "old.csv").write_text("\n".join(rows + [f"{image_id}_{present},nan"]) + "\n")
    notes = CsvRleReader(tmp_path / "images", tmp_path / "old.csv", kind="semantic").load(image_id).integrity
    assert notes["rle_missing_value_rows_dropped"] == {"count": 1, "examples": [f"{image_id} (old.csv line 6)"]}


# --- (2) images without a CSV row ----------------------------------------------------------------


def test_images_without_rows_are_counted_and_named(tmp_path, capsys):
    truth = write_csv_rle_dataset(tmp_path / "train_images", tmp_path / "train.csv", n=5, severstal=True,
                                  empty_images=2)
    unlisted = list(truth)[-2:]
    reader = CsvRleReader(tmp_path / "train_images", tmp_path / "train.csv", kind="semantic")
    assert reader.load(unlisted[0]).integrity == {"images_without_rows_empty":
                                                  {"count": 1, "examples": [unlisted[0]]}}
    data = preprocess(reader, settings(tmp_path))
    assert data.integrity == {"images_without_rows_empty": {"count": 2, "examples": unlisted}}
    assert "images_without_rows_empty: 2 " in capsys.readouterr().err
    excluding = CsvRleReader(tmp_path / "train_images", tmp_path / "train.csv", kind="semantic",
                             unlisted="exclude")
    assert preprocess(excluding, settings(tmp_path)).integrity == {}


# --- (3) an empty masks/ folder ------------------------------------------------------------------


def test_empty_masks_folder_is_counted_and_named(tmp_path, capsys):
    root = tmp_path / "stage1_train"
    ids = list(write_dsb_dataset(root, n_samples=3))
    for path in mask_files(root, ids[1]):
        path.unlink()
    reader = DsbReader(root)
    sample = reader.load(ids[1])
    assert sample.labels is not None and not sample.labels.any()
    assert sample.integrity == {"empty_mask_folders": {"count": 1, "examples": [f"{ids[1]}/masks"]}}
    data = preprocess(reader, settings(tmp_path))
    assert data.integrity == {"empty_mask_folders": {"count": 1, "examples": [f"{ids[1]}/masks"]}}
    assert "empty_mask_folders: 1 " in capsys.readouterr().err


# --- (4) overlap="first" -------------------------------------------------------------------------


def overlapping_dsb(tmp_path):
    """Three DSB samples; in the second, mask 2 is a duplicate that also covers mask 1."""
    root = tmp_path / "stage1_train"
    truth = write_dsb_dataset(root, n_samples=3)
    sample_id = list(truth)[1]
    first, second = mask_files(root, sample_id)[:2]
    shared = int((read_mask(first) > 0).sum())
    imwrite(second, np.maximum(read_mask(first), read_mask(second)))
    return root, truth, sample_id, first, second, shared


def test_overlaps_resolved_first_are_counted_with_their_pixels(tmp_path, capsys):
    root, truth, sample_id, first, second, shared = overlapping_dsb(tmp_path)
    example = f"{sample_id}/masks/{second.name} ({shared} px to {first.name})"
    sample = DsbReader(root, overlap="first").load(sample_id)
    assert same_partition(sample.labels, truth[sample_id][1])
    assert sample.integrity == {"overlaps_resolved_first": {"count": 1, "examples": [example], "pixels": shared}}
    data = preprocess(DsbReader(root, overlap="first"), settings(tmp_path))
    assert data.integrity == {"overlaps_resolved_first": {"count": 1, "examples": [example], "pixels": shared}}
    err = capsys.readouterr().err
    assert "overlaps_resolved_first: 1 " in err and f"{shared} pixel(s)" in err and second.name in err


# --- strict_labels ---------------------------------------------------------------------------------


def test_strict_labels_makes_each_case_an_error_naming_the_file(tmp_path):
    airbus_with_blank_rows(tmp_path)
    reader = CsvRleReader(tmp_path / "images", tmp_path / "train.csv")
    with pytest.raises(DataError, match=r"train\.csv line [37]") as error:
        preprocess(reader, settings(tmp_path, strict_labels=True))
    assert "strict_labels" in str(error.value)

    truth = write_csv_rle_dataset(tmp_path / "sev", tmp_path / "sev.csv", n=3, severstal=True, empty_images=1)
    unlisted = list(truth)[-1]
    with pytest.raises(DataError, match=rf"sev/{unlisted}.*without a CSV row"):
        preprocess(CsvRleReader(tmp_path / "sev", tmp_path / "sev.csv", kind="semantic"),
                   settings(tmp_path, strict_labels=True))

    root = tmp_path / "stage1_train"
    dsb_ids = list(write_dsb_dataset(root, n_samples=2))
    for path in mask_files(root, dsb_ids[0]):
        path.unlink()
    with pytest.raises(DataError, match=rf"{dsb_ids[0]}/masks"):
        preprocess(DsbReader(root), settings(tmp_path, strict_labels=True))


def test_strict_labels_accepts_an_explicit_overlap_first_and_counts_it(tmp_path):
    root, _, _, _, _, shared = overlapping_dsb(tmp_path)
    data = preprocess(DsbReader(root, overlap="first"), settings(tmp_path, strict_labels=True))
    assert data.integrity["overlaps_resolved_first"]["pixels"] == shared and len(data) == 3


def test_strict_labels_with_skip_leaves_the_samples_out(tmp_path):
    _, ids = airbus_with_blank_rows(tmp_path)
    reader = CsvRleReader(tmp_path / "images", tmp_path / "train.csv")
    lenient = preprocess(reader, settings(tmp_path))
    strict = preprocess(reader, settings(tmp_path, strict_labels=True, on_error="skip"))
    assert strict.directory != lenient.directory  # strict+skip writes another dataset
    assert strict.ids == ids[2:] and set(strict.skipped) == set(ids[:2]) and strict.integrity == {}
    again = preprocess(reader, settings(tmp_path, strict_labels=True, on_error="skip"))
    assert again.directory == strict.directory and again.ids == ids[2:] and again.integrity == {}


# --- the summary and the cache ---------------------------------------------------------------------


def test_summary_is_identical_on_a_cache_hit_and_kept_in_the_manifest(tmp_path, capsys):
    root, _, _, _, _, _ = overlapping_dsb(tmp_path)
    ids = sorted(p.name for p in root.iterdir())
    for path in mask_files(root, ids[2]):
        path.unlink()
    reader = DsbReader(root, overlap="first")
    first = preprocess(reader, settings(tmp_path))
    assert set(first.integrity) == {"overlaps_resolved_first", "empty_mask_folders"}
    json.dumps(first.integrity)  # plain JSON
    stamp = first.path(ids[0]).stat().st_mtime_ns
    assert capsys.readouterr().err.count(HEADER) == 1
    again = preprocess(reader, settings(tmp_path, n_jobs=2))
    assert again.directory == first.directory and again.path(ids[0]).stat().st_mtime_ns == stamp
    assert again.integrity == first.integrity
    assert capsys.readouterr().err.count(HEADER) == 1  # reported again, once
    manifest = json.loads((first.directory / MANIFEST).read_text())
    assert manifest["integrity"] == first.integrity
    assert set(again.load(ids[0])) == {"image", "target", "weight"}


def test_summary_survives_an_interrupted_run_and_an_older_manifest(tmp_path):
    root, _, _, _, _, _ = overlapping_dsb(tmp_path)
    reader = DsbReader(root, overlap="first")
    done = preprocess(reader, settings(tmp_path))
    # interrupted: no manifest, one sample missing; the finished ones keep their notes
    (done.directory / MANIFEST).unlink()
    done.path(done.ids[0]).unlink()
    assert preprocess(reader, settings(tmp_path)).integrity == done.integrity
    # a manifest written before notes were kept: they are counted again from the files
    manifest = json.loads((done.directory / MANIFEST).read_text())
    del manifest["integrity"]
    (done.directory / MANIFEST).write_text(json.dumps(manifest))
    assert preprocess(reader, settings(tmp_path)).integrity == done.integrity
    assert "integrity" in json.loads((done.directory / MANIFEST).read_text())


def test_strict_labels_keeps_the_cache_key_and_checks_a_cached_summary(tmp_path):
    assert "strict_labels" not in PreprocessSettings().output_key()
    assert PreprocessSettings(strict_labels=True).output_key() == PreprocessSettings().output_key()
    _, ids = airbus_with_blank_rows(tmp_path)
    reader = CsvRleReader(tmp_path / "images", tmp_path / "train.csv")
    lenient = preprocess(reader, settings(tmp_path))
    with pytest.raises(DataError, match=rf"strict_labels.*{ids[0]} \(train\.csv line 3\)"):
        preprocess(reader, settings(tmp_path, strict_labels=True))
    assert (lenient.directory / MANIFEST).is_file()


def test_clean_data_gives_an_empty_summary_and_no_warning(tmp_path, capsys):
    write_dsb_dataset(tmp_path / "stage1_train", n_samples=2)
    data = preprocess(DsbReader(tmp_path / "stage1_train"), settings(tmp_path, strict_labels=True))
    assert data.integrity == {} and HEADER not in capsys.readouterr().err


def test_base_config_documents_strict_labels():
    from kseg.core.config import load_config

    text = (Path(__file__).resolve().parents[2] / "pipelines" / "_base.yaml").read_text()
    line = next(line for line in text.splitlines() if line.strip().startswith("strict_labels:"))
    assert "#" in line
    assert PreprocessSettings.from_config(load_config("demo").preprocess).strict_labels is False
