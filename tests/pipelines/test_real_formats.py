"""Every shipped pipeline on its competition's own file formats, end to end through the public API.

For each pipeline a tiny competition is written in the real layout (file type, bit depth, colour
mode, image size, file naming, run-length order; see ``fixtures_competitions``), then
``kseg.load_config`` -> ``kseg.train`` (preprocessing and one training step of a tiny model) ->
``kseg.submit`` (which validates the CSV and raises when it is invalid). The written CSV is then
read back independently of kseg's validator: header, ids, and every cell decoded in the format's
pixel order at the test image's size. Severstal, Airbus and SIIM-ACR have no pipeline of their own
but ship as submission formats; the demo U-Net configuration is trained on their layouts.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from fixtures_competitions import (
    CARVANA_SHAPE,
    SEVERSTAL_SHAPE,
    Competition,
    write_airbus,
    write_carvana,
    write_dsb2018,
    write_isbi2012,
    write_severstal,
    write_siim_acr,
    write_tgs_salt,
)
from fixtures_datasets import same_partition

import kseg
from kseg.codecs import rle
from kseg.codecs.relative import to_absolute
from kseg.core.formats import get_format
from kseg.data.pipeline import train_reader
from kseg.io.readers import open_dataset
from kseg.io.sample import read_image

TINY_UNET = ("model.args.depth=2", "model.args.base_filters=4")
TINY_MASKRCNN = {"backbone": "small", "width": 4, "fpn_channels": 8, "fc_channels": 16, "mask_channels": 8,
                 "mask_convs": 1, "rpn_pre_nms": 200, "rpn_post_nms": 50, "max_detections": 20}


def one_step(tmp_path: Path, *extra: str) -> list[str]:
    """Overrides for one training step with everything written under ``tmp_path``."""
    return [
        f"preprocess.cache_dir={tmp_path / 'cache'}", "preprocess.n_jobs=1", "preprocess.progress=false",
        f"train.runs_dir={tmp_path / 'runs'}", "train.epochs=1", "train.steps_per_epoch=1", "train.verbose=0",
        f"submission.dir={tmp_path / 'submissions'}", "submission.sheet_images=1", *extra,
    ]


def read_csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as handle:
        header, *rows = list(csv.reader(handle))
    return header, rows


def decode_cell(cell: str, shape: tuple[int, int], fmt) -> np.ndarray:
    """One RLE cell as the competition's scorer reads it (relative for SIIM-ACR, ``-1`` empty)."""
    cell = cell.strip()
    if cell == fmt.empty:
        return np.zeros(shape, np.uint8)
    if fmt.relative:
        cell = to_absolute(cell)
    return rle.decode(cell, shape, fmt.order)


def parse_boxes(cell: str, shape: tuple[int, int]) -> np.ndarray:
    """A PredictionString as (K, 5) rows of score, x, y, w, h, each box inside the image."""
    values = np.array(cell.split(), np.float64)
    assert values.size % 5 == 0, cell[:80]
    table = values.reshape(-1, 5)
    score, x, y, w, h = table.T
    height, width = shape
    assert np.all((score >= 0) & (score <= 1)) and np.all((w > 0) & (h > 0)), cell[:80]
    assert np.all((x >= -1) & (y >= -1) & (x + w <= width + 1) & (y + h <= height + 1)), cell[:80]
    return table


def check_csv(path: Path, format_name: str, sizes: dict[str, tuple[int, int]],
              num_classes: int | None = None) -> dict[str, list[np.ndarray]]:
    """Read a submission without kseg's validator: header, the ids of ``sizes`` (each exactly as
    often as the format writes it), every cell decoded at its image's size. Returns id -> masks."""
    fmt = get_format(format_name)
    header, rows = read_csv_rows(path)
    assert tuple(header) == fmt.columns, header
    assert all(len(row) == len(header) for row in rows), "ragged rows"
    masks: dict[str, list[np.ndarray]] = {}
    for row in rows:
        image_id = row[0]
        assert image_id in sizes, f"unexpected id {image_id!r}"
        if fmt.boxes:
            masks.setdefault(image_id, []).append(parse_boxes(row[-1], sizes[image_id]))
            continue
        masks.setdefault(image_id, []).append(decode_cell(row[-1], sizes[image_id], fmt))
    assert set(masks) == set(sizes), f"missing ids {set(sizes) - set(masks)}"
    counts = {i: len(m) for i, m in masks.items()}
    if fmt.rows in ("image", "image_boxes"):
        assert set(counts.values()) == {1}, counts
    elif fmt.rows == "image_class":
        assert set(counts.values()) == {num_classes}, counts
        for image_id in sizes:
            classes = [int(row[1]) for row in rows if row[0] == image_id]
            assert classes == list(range(1, num_classes + 1)), classes
    else:  # instance rows never overlap
        for image_id, instance_masks in masks.items():
            assert np.sum(instance_masks, axis=0).max(initial=0) <= 1, f"{image_id}: instances overlap"
    return masks


def sizes_of(paths: dict[str, Path]) -> dict[str, tuple[int, int]]:
    return {i: read_image(p).shape[:2] for i, p in paths.items()}


def assert_reads_truth(cfg, data: Competition) -> None:
    """The config's reader lists the training images and loads the masks the fixture drew."""
    reader = train_reader(cfg)
    assert sorted(reader.ids()) == sorted(data.truth)
    for sample_id, truth in data.truth.items():
        sample = reader.load(sample_id)
        assert sample.image.shape[:2] == truth.shape[:2] and sample.image.dtype == np.uint8, sample_id
        if sample.labels is not None:
            assert same_partition(sample.labels, truth), sample_id
        else:
            assert np.array_equal(sample.mask, truth), sample_id


def trained(cfg) -> Path:
    """Train, and check the run finished with its checkpoints and a finite validation score."""
    result = kseg.train(cfg)
    run = Path(result.run_dir)
    for name in ("best.keras", "last.keras", "history.csv", "results.json"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert np.isfinite(results["val_score"]), results
    return run


def monitor(run: Path) -> str:
    return json.loads((run / "results.json").read_text())["monitor"]


# -- TGS Salt --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tgs_salt_unet_on_its_file_format(tmp_path):
    """101x101 RGB PNG tiles + 16-bit 0/65535 masks: native tiles as one grey channel, train, submit
    id,rle_mask (F)."""
    data = write_tgs_salt(tmp_path / "tgs", n_train=6, n_test=2)
    cfg = kseg.load_config("tgs_salt", model="unet", data_root=data.root, overrides=one_step(
        tmp_path, *TINY_UNET, "generator.batch_size=4", "split.n_folds=3"))
    assert (cfg.preprocess.mode, cfg.preprocess.size, cfg.preprocess.channels) == ("none", None, 1)
    assert_reads_truth(cfg, data)
    run = trained(cfg)
    assert monitor(run) == "val_tgs_iou_map"

    out = tmp_path / "submission.csv"
    result = kseg.submit(run, test_dir=data.root / "test" / "images", sample=data.root / "sample_submission.csv",
                         output=out, progress=False)
    assert result.csv == out and result.report.images == 2
    _, rows = read_csv_rows(out)
    assert [r[0] for r in rows] == data.test_ids  # the sample submission's order
    masks = check_csv(out, "tgs_salt", {i: (101, 101) for i in data.test_ids})
    assert all(m[0].shape == (101, 101) for m in masks.values())


def test_tgs_salt_16bit_masks_read_as_binary_masks(tmp_path):
    """The reader turns the 16-bit masks into 0/1 masks equal to train.csv's column-major RLE,
    for an empty tile, a partly salt tile and a tile that is salt everywhere (coverage 100 %,
    which the competition's training set holds: its mask file is all 65535)."""
    data = write_tgs_salt(tmp_path / "tgs", n_train=3, n_test=0, kinds=("empty", "partial", "full"))
    reader = open_dataset("paired", data.root / "train" / "images", data.root / "train" / "masks")
    mask_file = data.root / "train" / "masks" / f"{data.train_ids[2]}.png"
    raw = cv2.imread(str(mask_file), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and np.unique(raw).tolist() == [65535]
    _, rows = read_csv_rows(data.root / "train.csv")
    for (tile_id, cell), expected in zip(rows, (0, None, 101 * 101)):
        sample = reader.load(tile_id)
        assert sample.image.shape == (101, 101, 3) and sample.image.dtype == np.uint8
        assert np.array_equal(sample.mask, rle.decode(cell, (101, 101), "F")), tile_id
        if expected is not None:
            assert int(sample.mask.sum()) == expected


@pytest.mark.slow
def test_tgs_salt_unet_on_the_real_sample(shared_data, tmp_path):
    """One step on the 100 real rows, then a submission for three of their images as a test folder."""
    root = shared_data / "tgs_salt_sample"
    if not (root / "train" / "images").is_dir():
        pytest.skip(f"{root} is absent (the TGS Salt sample of ../shared/data)")
    cfg = kseg.load_config("tgs_salt", model="unet", data_root=root, overrides=one_step(
        tmp_path, *TINY_UNET, "generator.batch_size=4"))
    reader = train_reader(cfg)
    _, rows = read_csv_rows(root / "train.csv")
    assert sorted(reader.ids()) == sorted(r[0] for r in rows)
    for tile_id, cell in rows:  # the 16-bit mask files equal train.csv's column-major RLE
        assert np.array_equal(reader.load(tile_id).mask, rle.decode(cell, (101, 101), "F")), tile_id
    run = trained(cfg)
    test_dir = tmp_path / "test" / "images"
    test_dir.mkdir(parents=True)
    ids = sorted(p.stem for p in (root / "train" / "images").glob("*.png"))[:3]
    for tile_id in ids:
        shutil.copy(root / "train" / "images" / f"{tile_id}.png", test_dir)
    result = kseg.submit(run, test_dir=test_dir, output=tmp_path / "submission.csv", progress=False)
    assert result.report.images == 3
    check_csv(result.csv, "tgs_salt", {i: (101, 101) for i in ids})


# -- Carvana ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_carvana_unet_on_its_file_format(tmp_path):
    """1918x1280 JPEGs + palette GIF masks, resized for training; img,rle_mask (C) at full size,
    ids are the file names listed by the sample submission."""
    data = write_carvana(tmp_path / "carvana", n_cars=1, angles=(1, 2), n_test=1)
    cfg = kseg.load_config("carvana", model="unet", data_root=data.root, overrides=one_step(
        tmp_path, *TINY_UNET, "generator.batch_size=1", "split.n_folds=2", "predict.tta=none"))
    assert cfg.preprocess.mode == "resize" and cfg.dataset.options["mask_suffix"] == "_mask"
    assert_reads_truth(cfg, data)
    run = trained(cfg)
    assert monitor(run) == "val_dice"

    result = kseg.submit(run, output=tmp_path / "submission.csv", progress=False)  # the config's test/ + sample
    assert result.report.images == 1
    _, rows = read_csv_rows(result.csv)
    assert [r[0] for r in rows] == data.test_ids and data.test_ids[0].endswith("_01.jpg")
    check_csv(result.csv, "carvana", {i: CARVANA_SHAPE for i in data.test_ids})


def test_carvana_gif_masks_equal_train_masks_csv(tmp_path):
    """The palette GIFs (indices 0/1 under a black/white palette) read as the 0/1 masks that
    train_masks.csv encodes row-major, at the photographs' 1918x1280."""
    data = write_carvana(tmp_path / "carvana", n_cars=1, angles=(1, 2), n_test=0)
    reader = open_dataset("paired", data.root / "train", data.root / "train_masks", mask_suffix="_mask")
    assert reader.ids() == data.train_ids
    _, rows = read_csv_rows(data.root / "train_masks.csv")
    assert [r[0] for r in rows] == [f"{stem}.jpg" for stem in data.train_ids]
    for stem, (_, cell) in zip(data.train_ids, rows):
        sample = reader.load(stem)
        assert sample.image.shape == (*CARVANA_SHAPE, 3)
        assert np.array_equal(sample.mask, rle.decode(cell, CARVANA_SHAPE, "C")), stem


def test_carvana_grey_palette_gif_masks_read_at_full_size(tmp_path):
    """A 1918x1280 mask GIF of 0/255 under a grey-ramp palette (entry v = grey v, what
    fixtures_datasets.write_gif writes; Pillow opens such a GIF in mode L) reads as the mask."""
    from fixtures_datasets import write_gif

    data = write_carvana(tmp_path / "carvana", n_cars=1, angles=(1,), n_test=0)
    stem = data.train_ids[0]
    write_gif(data.root / "train_masks" / f"{stem}_mask.gif", data.truth[stem] * 255)
    reader = open_dataset("paired", data.root / "train", data.root / "train_masks", mask_suffix="_mask")
    assert np.array_equal(reader.load(stem).mask, data.truth[stem])


# -- ISBI 2012 -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_isbi2012_unet_trains_and_predicts_masks(tmp_path):
    """512x512 grey PNG pairs: the monitor is the membrane IoU (class 0) and predict writes one
    PNG per image (there is no Kaggle submission)."""
    data = write_isbi2012(tmp_path / "isbi", n=4)
    cfg = kseg.load_config("isbi2012", model="unet", data_root=data.root, overrides=one_step(
        tmp_path, *TINY_UNET, "generator.batch_size=2", "split.n_folds=4", "predict.tta=none"))
    assert_reads_truth(cfg, data)
    run = trained(cfg)
    assert monitor(run) == "val_class0_iou"
    check_predicted_folder(run, data.root / "images", ["0", "1"], tmp_path / "predicted")


def check_predicted_folder(run: Path, images: Path, stems: list[str], out: Path) -> None:
    """kseg.predict on a folder of ISBI images: one 512x512 PNG per image, as its kind says (the
    pipeline's format, dsb_instances: 16-bit cell labels); with an image-row format (tgs_salt)
    the PNGs are 0/255 masks."""
    folder = out.parent / "inputs"
    folder.mkdir(parents=True)
    for stem in stems:
        shutil.copy(images / f"{stem}.png", folder)
    for overrides, kind, dtype in (((), "instances", np.uint16), (("submission.format=tgs_salt",), "mask", np.uint8)):
        result = kseg.predict(run, folder, output=out / kind, overrides=overrides, progress=False)
        assert result.kind == kind
        assert sorted(p.name for p in (out / kind).glob("*.png")) == sorted(f"{s}.png" for s in stems)
        for stem in stems:
            picture = cv2.imread(str(out / kind / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
            assert picture is not None and picture.shape == (512, 512) and picture.dtype == dtype, stem
            if kind == "mask":
                assert set(np.unique(picture).tolist()) <= {0, 255}


@pytest.mark.slow
def test_isbi2012_unet_on_the_real_membranes(shared_data, tmp_path):
    root = shared_data / "isbi2012_membrane"
    if not (root / "images").is_dir():
        pytest.skip(f"{root} is absent (the ISBI 2012 membranes of ../shared/data)")
    cfg = kseg.load_config("isbi2012", model="unet", data_root=root, overrides=one_step(
        tmp_path, *TINY_UNET, "generator.batch_size=2", "predict.tta=none"))
    run = trained(cfg)
    assert monitor(run) == "val_class0_iou"
    check_predicted_folder(run, root / "images", ["0"], tmp_path / "predicted")


# -- Data Science Bowl 2018 ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dsb2018(tmp_path_factory) -> Competition:
    """A tiny stage-1 download: 4 training and 2 test images (72x96 RGBA) of 4 nuclei each."""
    return write_dsb2018(tmp_path_factory.mktemp("dsb2018"), n_train=4, n_test=2)


def dsb_test_sizes(root: Path) -> dict[str, tuple[int, int]]:
    folder = root / "stage1_test"
    return sizes_of({p.name: p / "images" / f"{p.name}.png" for p in sorted(folder.iterdir())})


DSB_MODELS = {
    "unet": [*TINY_UNET, "generator.crop_size=[64,64]", "generator.batch_size=2"],
    "fcn": ["model.args.width=4", "generator.crop_size=[64,64]", "generator.batch_size=2"],
    "ssd": ["model.args.width=4", "detection.input_size=[64,64]", "generator.batch_size=2"],
    "maskrcnn": [*(f"model.args.{k}={v}" for k, v in TINY_MASKRCNN.items()), "detection.input_size=[64,64]",
                 "detection.rois_per_image=16", "detection.max_instances=16", "generator.batch_size=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("model", list(DSB_MODELS))
def test_dsb2018_pipelines_on_the_stage1_layout(model, dsb2018, tmp_path):
    """stage1_train/<id>/images/<id>.png (RGBA) + masks/*.png: each dsb2018 pipeline trains one
    step and submits the stage1_test folders (DSB instances, or box rows for the SSD)."""
    dsb_root = dsb2018.root
    cfg = kseg.load_config("dsb2018", model=model, data_root=dsb_root, overrides=one_step(
        tmp_path, "split.n_folds=4", "predict.tta=none", *DSB_MODELS[model]))
    assert cfg.model.name == model and cfg.dataset.layout == "dsb"
    assert_reads_truth(cfg, dsb2018)
    run = trained(cfg)
    assert monitor(run) == ("val_map50" if model == "ssd" else "val_iou_map")
    sizes = dsb_test_sizes(dsb_root)
    result = kseg.submit(run, test_dir=dsb_root / "stage1_test", output=tmp_path / "submission.csv",
                         sample=None if model == "ssd" else dsb_root / "stage1_sample_submission.csv",
                         progress=False)
    assert result.report.images == 2
    check_csv(result.csv, "wheat_boxes" if model == "ssd" else "dsb_instances", sizes)


# -- the demo competition --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("model", ["unet", "ssd", "maskrcnn"])
def test_demo_pipelines_end_to_end(model, demo_root, tmp_path):
    """demo, demo_ssd and demo_maskrcnn: one step on the synthetic DSB-layout competition, then
    the config's own test folder (and sample submission, for the mask formats)."""
    extra = {
        "unet": [*TINY_UNET, "generator.crop_size=[64,64]", "generator.batch_size=2"],
        "ssd": DSB_MODELS["ssd"],
        "maskrcnn": [*DSB_MODELS["maskrcnn"], "detection.max_instances=64"],
    }[model]
    cfg = kseg.load_config("demo", model=model, data_root=demo_root, overrides=one_step(
        tmp_path, "dataset.demo=false", "split.n_folds=5", "predict.tta=none", *extra))
    run = trained(cfg)
    result = kseg.submit(run, output=tmp_path / "submission.csv", progress=False)
    assert result.report.images == 2
    check_csv(result.csv, cfg.submission.format, dsb_test_sizes(demo_root))


# -- formats without a pipeline: Severstal, Airbus, SIIM-ACR ---------------------------------------
def csv_rle_layout(name: str, train: str, masks: str, test: str, sample: str | None = None) -> list[str]:
    return [f"dataset.name={name}", "dataset.layout=csv_rle", f"dataset.train={train}", f"dataset.masks={masks}",
            f"dataset.test={test}", f"dataset.sample_submission={sample or 'null'}", "dataset.solution=null",
            "dataset.demo=false"]


@pytest.mark.slow
def test_severstal_layout_and_submission(tmp_path):
    """train_images/*.jpg (1600x256) + train.csv of ImageId,ClassId,EncodedPixels rows: a 4-class
    softmax U-Net, submitted as one row per test image and class (ids with the extension)."""
    data = write_severstal(tmp_path / "severstal", n_train=4, n_test=1)
    cfg = kseg.load_config("demo", data_root=data.root, overrides=one_step(
        tmp_path, *csv_rle_layout("severstal", "train_images", "train.csv", "test_images"),
        "dataset.options.kind=semantic", "dataset.options.num_classes=4",
        "generator.targets=classes", "model.args.n_classes=5", "train.loss=ce", "postprocess.method=components",
        "submission.format=severstal", *TINY_UNET, "generator.crop_size=[128,128]", "generator.batch_size=2",
        "split.n_folds=4", "predict.tta=none"))
    assert_reads_truth(cfg, data)
    run = trained(cfg)
    assert monitor(run) == "val_dice"
    result = kseg.submit(run, output=tmp_path / "submission.csv", progress=False)
    assert result.report.images == 1
    check_csv(result.csv, "severstal", {i: SEVERSTAL_SHAPE for i in data.test_ids}, num_classes=4)


@pytest.mark.slow
def test_airbus_layout_and_submission(tmp_path):
    """train_v2/*.jpg (768x768) + one CSV row per ship (an empty row for no ship): instances,
    submitted as airbus_instances rows for the sample submission's ids (file names)."""
    data = write_airbus(tmp_path / "airbus", n_train=3, n_test=2)
    cfg = kseg.load_config("demo", data_root=data.root, overrides=one_step(
        tmp_path, *csv_rle_layout("airbus", "train_v2", "train_ship_segmentations_v2.csv", "test_v2",
                                  "sample_submission_v2.csv"),
        "dataset.options.kind=instance", "submission.format=airbus_instances", *TINY_UNET,
        "generator.crop_size=[128,128]", "generator.batch_size=2", "split.n_folds=3", "predict.tta=none"))
    assert_reads_truth(cfg, data)
    run = trained(cfg)
    assert monitor(run) == "val_f2"
    result = kseg.submit(run, output=tmp_path / "submission.csv", progress=False)
    assert result.report.images == 2
    check_csv(result.csv, "airbus_instances", {i: (768, 768) for i in data.test_ids})


@pytest.mark.slow
def test_siim_acr_submission(tmp_path):
    """SIIM-ACR: PNGs named by DICOM UID (dots in the id), trained from the converted 0/255 PNG
    masks; the submission holds one row per image, relative RLE or -1."""
    data = write_siim_acr(tmp_path / "siim", n_train=4, n_test=2)
    cfg = kseg.load_config("demo", data_root=data.root, overrides=one_step(
        tmp_path, "dataset.name=siim_acr", "dataset.layout=paired", "dataset.train=train", "dataset.masks=masks",
        "dataset.test=test", "dataset.sample_submission=null", "dataset.solution=null", "dataset.demo=false",
        "preprocess.channels=1", "generator.targets=mask", "postprocess.method=components",
        "submission.format=siim_acr", *TINY_UNET, "generator.crop_size=[64,64]", "generator.batch_size=2",
        "split.n_folds=4", "predict.tta=none"))
    assert_reads_truth(cfg, data)
    run = trained(cfg)
    assert monitor(run) == "val_dice"
    result = kseg.submit(run, output=tmp_path / "submission.csv", progress=False)
    assert result.report.images == 2
    _, rows = read_csv_rows(result.csv)
    assert sorted(r[0] for r in rows) == sorted(data.test_ids)
    assert all(r[1] == "-1" or r[1].split() for r in rows)
    check_csv(result.csv, "siim_acr", {i: (128, 128) for i in data.test_ids})
