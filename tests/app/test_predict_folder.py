"""``kseg predict``: a folder of images -> one PNG per image, predicted through the submission path,
so the label images, masks and boxes it writes equal what ``make submit`` encodes in its CSV."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
import pytest

from kseg.app.predict import (
    BOX_COLUMNS,
    PredictResult,
    box_table,
    open_prediction,
    predict_images,
    probability_picture,
    target_picture,
    write_box_table,
)
from kseg.core.config import load_config
from kseg.core.errors import ConfigError, DataError
from kseg.data.masks import clean_mask
from kseg.io.sample import read_image
from kseg.submission.formats import get_format
from kseg.submission.make import make_submission
from kseg.submission.reading import read_box_targets, read_targets

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def golden_run(folder: Path, family: str) -> Path:
    """A copy of a committed run (trained on the demo_root fixture's data); never write into tests/golden."""
    run = folder / family
    shutil.copytree(GOLDEN / family, run)
    return run


def demo_test_images(demo_root: Path) -> dict[str, Path]:
    """id -> image path of the demo test set (DSB layout <id>/images/<id>.png)."""
    test_dir = demo_root / "stage1_test"
    return {i.name: i / "images" / f"{i.name}.png" for i in sorted(test_dir.iterdir()) if i.is_dir()}


def read_png(path: Path) -> np.ndarray:
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert array is not None, path
    return array


def sizes_of(images: dict[str, Path]) -> dict[str, tuple[int, int]]:
    return {i: read_image(p).shape[:2] for i, p in images.items()}


# The stand-in softmax run: logits of background, class 1 (red) and class 2 (blue) from RGB in 0..1.
CLASS_WEIGHTS = np.array([[0.0, 12.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 12.0]], np.float32)
CLASS_BIAS = np.array([0.0, -3.0, -3.0], np.float32)


def stand_in_run(folder: Path, demo_root: Path, overrides=(), classes: bool = False) -> Path:
    """A run directory whose checkpoint is a fixed 1x1 convolution (no training): bright pixels are
    foreground; with ``classes`` a 3-way softmax (background, reddish, bluish pixels)."""
    run = folder / "demo-unet-20240101-000000"
    run.mkdir(parents=True)
    extra = ["generator.targets=classes", "model.args.n_classes=3", "train.loss=ce"] if classes else []
    cfg = load_config("demo", data_root=str(demo_root), overrides=[
        "model.args.depth=2", "predict.tta=flips", "postprocess.method=components", "postprocess.min_size=8",
        f"train.runs_dir={folder}", *extra, *overrides])
    cfg.dump(run / "config.yaml")
    inputs = keras.Input((None, None, 3), name="image")
    if classes:
        layer = keras.layers.Conv2D(3, 1, activation="softmax")
        weights, bias = CLASS_WEIGHTS[None, None], CLASS_BIAS
    else:
        layer = keras.layers.Conv2D(2, 1, activation="sigmoid")
        weights, bias = np.full((1, 1, 3, 2), 10.0, np.float32), np.array([-6.0, -12.0], np.float32)
    model = keras.Model(inputs, layer(inputs))
    layer.set_weights([weights, bias])
    model.save(run / "best.keras")
    (run / "status.json").write_text(json.dumps({"state": "finished"}))
    return run


# -- U-Net (golden run): instance label images, probabilities -------------------------------------
@pytest.fixture(scope="module")
def unet(tmp_path_factory, demo_root):
    """The golden U-Net run predicted on the demo test folder (with probabilities) and submitted."""
    folder = tmp_path_factory.mktemp("unet")
    run = golden_run(folder, "unet")
    overrides = [f"dataset.root={demo_root}"]
    result = predict_images([run], demo_root / "stage1_test", folder / "out", probabilities=True,
                            overrides=overrides, progress=False)
    submitted = make_submission([run], overrides=overrides, out_dir=folder / "subs", progress=False)
    return result, submitted


def test_unet_run_writes_16bit_label_pngs_that_equal_the_submission(unet, demo_root):
    result, submitted = unet
    images = demo_test_images(demo_root)
    assert isinstance(result, PredictResult) and result.kind == "instances" and len(result.runs) == 1
    labels = [p for p in result.written if not p.stem.endswith("_probabilities")]
    assert sorted(p.name for p in labels) == sorted(f"{i}.png" for i in images)
    assert all(p.parent == result.output for p in result.written)
    decoded = read_targets(submitted.csv, get_format("dsb_instances"), sizes_of(images))
    for image_id, path in images.items():
        written = read_png(result.output / f"{image_id}.png")
        assert written.dtype == np.uint16 and written.shape == read_image(path).shape[:2]
        assert written.max() > 0, "the golden run finds nuclei in every demo test image"
        np.testing.assert_array_equal(written, decoded[image_id], err_msg=image_id)


def test_unet_probabilities_pngs_have_the_image_size_and_agree_with_the_labels(unet, demo_root):
    result, _ = unet
    for image_id, path in demo_test_images(demo_root).items():
        picture = result.output / f"{image_id}_probabilities.png"
        assert picture in result.written
        probabilities = read_png(picture)
        labels = read_png(result.output / f"{image_id}.png")
        # mask+border model: two channels, so channel 0 alone, as grey
        assert probabilities.dtype == np.uint8 and probabilities.shape == read_image(path).shape[:2]
        # the run's post-processing (threshold 0.5, holes filled, pieces under 8 pixels dropped) on the
        # 8-bit channel 0 gives the written foreground, up to pixels within rounding of the threshold
        foreground = clean_mask(probabilities >= 128, min_size=8)
        assert np.mean(foreground == (labels > 0)) > 0.999


# -- binary masks (rows "image") -------------------------------------------------------------------
def test_binary_mask_pngs_are_0_or_255_and_equal_the_submission(tmp_path, demo_root):
    run = golden_run(tmp_path, "unet")
    # the demo's sample submission has DSB columns: list the test folder instead
    overrides = [f"dataset.root={demo_root}", "submission.format=tgs_salt", "dataset.sample_submission=null"]
    result = predict_images(run, demo_root / "stage1_test", tmp_path / "out", overrides=overrides, progress=False)
    submitted = make_submission([run], overrides=overrides, out_dir=tmp_path / "subs", progress=False)
    images = demo_test_images(demo_root)
    decoded = read_targets(submitted.csv, get_format("tgs_salt"), sizes_of(images))
    assert result.kind == "mask" and len(result.written) == len(images)
    for image_id in images:
        mask = read_png(tmp_path / "out" / f"{image_id}.png")
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
        np.testing.assert_array_equal(mask > 0, decoded[image_id] > 0, err_msg=image_id)


# -- class-index masks (rows "image_class") with a stand-in softmax run ---------------------------
def test_class_index_pngs_equal_the_submission_and_probabilities_are_rgb(tmp_path, demo_root):
    run = stand_in_run(tmp_path / "runs", demo_root, ["submission.format=severstal", "submission.num_classes=2",
                                                          "dataset.sample_submission=null"],
                       classes=True)
    images = demo_test_images(demo_root)
    inputs = list(images.values())  # files, not a folder
    result = predict_images([run], inputs, tmp_path / "out", probabilities=True, progress=False)
    submitted = make_submission([run], out_dir=tmp_path / "subs", progress=False)
    stacks = read_targets(submitted.csv, get_format("severstal"), sizes_of(images), num_classes=2)
    assert result.kind == "classes"
    seen = set()
    for image_id in images:
        classes = read_png(tmp_path / "out" / f"{image_id}.png")
        stack = stacks[image_id]
        expected = (stack * np.arange(1, stack.shape[-1] + 1)).max(axis=-1)
        assert classes.dtype == np.uint8
        np.testing.assert_array_equal(classes, expected, err_msg=image_id)
        seen |= set(np.unique(classes).tolist())
        bgr = read_png(tmp_path / "out" / f"{image_id}_probabilities.png")
        assert bgr.shape == (*classes.shape, 3) and bgr.dtype == np.uint8
        # RGB = probabilities of classes 0, 1, 2. The stand-in is a 1x1 convolution, so flips change
        # nothing and its softmax can be computed here directly.
        logits = read_image(images[image_id]).astype(np.float32) / 255 @ CLASS_WEIGHTS + CLASS_BIAS
        softmax = np.exp(logits - logits.max(axis=-1, keepdims=True))
        softmax /= softmax.sum(axis=-1, keepdims=True)
        difference = bgr[..., ::-1].astype(int) - np.round(softmax * 255).astype(int)
        assert np.abs(difference).max() <= 1
    assert seen <= {0, 1, 2} and len(seen) > 1


# -- SSD (golden run): pictures and boxes.csv -------------------------------------------------------
def test_ssd_run_draws_boxes_and_writes_boxes_csv_equal_to_the_submission(tmp_path, demo_root):
    run = golden_run(tmp_path, "ssd")
    overrides = [f"dataset.root={demo_root}"]
    result = predict_images([run], demo_root / "stage1_test", tmp_path / "out", overrides=overrides,
                            progress=False)
    submitted = make_submission([run], overrides=overrides, out_dir=tmp_path / "subs", progress=False)
    images = demo_test_images(demo_root)
    assert result.kind == "boxes" and result.written[-1] == tmp_path / "out" / "boxes.csv"
    for image_id, path in images.items():
        picture = read_png(tmp_path / "out" / f"{image_id}.png")
        image = read_image(path)
        assert picture.dtype == np.uint8 and picture.shape == (*image.shape[:2], 3)
        assert not np.array_equal(picture[..., ::-1], np.broadcast_to(image, picture.shape)), "boxes are drawn"

    table = pd.read_csv(tmp_path / "out" / "boxes.csv", dtype={"image": str})
    assert tuple(table.columns) == BOX_COLUMNS
    assert list(pd.unique(table["image"])) == list(images)  # input order, every image
    assert (table["label"] == 1).all() and table["score"].between(0, 1).all()
    expected = read_box_targets(submitted.csv, get_format("wheat_boxes"), sizes_of(images))
    for image_id in images:
        rows = table[table["image"] == image_id]
        order = np.argsort(-rows["score"].to_numpy(), kind="stable")  # the PredictionString is best first
        boxes = rows[["x_min", "y_min", "x_max", "y_max"]].to_numpy()[order]
        scores = rows["score"].to_numpy()[order]
        corners = np.round(boxes, 1)
        kept = ((corners[:, 2:] - corners[:, :2]) > 0).all(axis=1)  # boxes with no width after rounding are dropped
        assert kept.sum() == len(expected[image_id]["boxes"]) > 0
        np.testing.assert_allclose(boxes[kept], expected[image_id]["boxes"], atol=0.05 + 1e-4)
        np.testing.assert_allclose(scores[kept], expected[image_id]["scores"], atol=5e-5 + 1e-7)


# -- Mask R-CNN (golden run): instance label images -------------------------------------------------
def test_maskrcnn_run_writes_16bit_label_pngs_that_equal_the_submission(tmp_path, demo_root):
    run = golden_run(tmp_path, "maskrcnn")
    overrides = [f"dataset.root={demo_root}"]
    result = predict_images([run], demo_root / "stage1_test", tmp_path / "out", overrides=overrides,
                            progress=False)
    submitted = make_submission([run], overrides=overrides, out_dir=tmp_path / "subs", progress=False)
    images = demo_test_images(demo_root)
    decoded = read_targets(submitted.csv, get_format("dsb_instances"), sizes_of(images))
    assert result.kind == "instances"
    assert sorted(p.name for p in result.written) == sorted(f"{i}.png" for i in images)
    for image_id, path in images.items():
        labels = read_png(tmp_path / "out" / f"{image_id}.png")
        assert labels.dtype == np.uint16 and labels.shape == read_image(path).shape[:2]
        np.testing.assert_array_equal(labels, decoded[image_id], err_msg=image_id)


# -- errors -------------------------------------------------------------------------------------------
def test_duplicate_stems_and_empty_folders_are_refused_before_anything_is_written(tmp_path, demo_root):
    run = stand_in_run(tmp_path / "runs", demo_root)
    source = next(iter(demo_test_images(demo_root).values()))
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    shutil.copy(source, first / "x.png")
    shutil.copy(source, second / "x.png")
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        predict_images(run, [first, second], out, progress=False)
    assert str(first / "x.png") in str(info.value) and str(second / "x.png") in str(info.value)
    shutil.copy(source, first / "x.jpg")  # same stem in one folder
    with pytest.raises(DataError, match="x.jpg"):
        predict_images(run, first, out, progress=False)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as info:
        predict_images(run, empty, out, progress=False)
    assert str(empty) in str(info.value) and "no image" in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        predict_images(run, tmp_path / "missing.png", out, progress=False)
    with pytest.raises(DataError, match="overwrite an input"):
        predict_images(run, second, second, progress=False)
    assert not out.exists()


def test_an_unreadable_image_names_the_file(tmp_path, demo_root):
    run = stand_in_run(tmp_path / "runs", demo_root)
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError) as info:
        predict_images(run, images, tmp_path / "out", progress=False)
    assert str(images / "broken.png") in str(info.value)


def test_probabilities_of_a_box_run_are_refused(tmp_path, demo_root):
    run = golden_run(tmp_path, "ssd")
    with pytest.raises(ConfigError, match="probabilities"):
        predict_images(run, demo_root / "stage1_test", tmp_path / "out", probabilities=True,
                       overrides=[f"dataset.root={demo_root}"], progress=False)
    assert not (tmp_path / "out").exists()


def test_a_stand_in_run_predicts_a_flat_folder_by_stem(tmp_path, demo_root):
    run = stand_in_run(tmp_path / "runs", demo_root)
    flat = tmp_path / "flat"
    flat.mkdir()
    for n, path in enumerate(demo_test_images(demo_root).values()):
        shutil.copy(path, flat / f"img{n}.png")
    (flat / ".hidden.png").write_bytes(b"")  # hidden files are not images
    result = predict_images(run, flat, tmp_path / "out" / "nested", progress=False)
    assert [p.name for p in result.written] == ["img0.png", "img1.png"]
    assert result.runs == [run] and result.output == tmp_path / "out" / "nested"
    for n in range(2):
        labels = read_png(result.output / f"img{n}.png")
        assert labels.dtype == np.uint16 and labels.shape == read_image(flat / f"img{n}.png").shape[:2]
    # the in-memory path (kseg.predict without an output folder) opens the same submission
    submission, kind = open_prediction([run])
    assert kind == "instances"
    np.testing.assert_array_equal(submission.predict(submission.read(flat / "img1.png")),
                                  read_png(result.output / "img1.png"))


# -- what is written, without a model ------------------------------------------------------------------
def test_written_arrays_by_kind_and_the_16bit_instance_limit(tmp_path):
    source = tmp_path / "many.png"
    labels = np.zeros((300, 300), np.int32)
    labels.ravel()[:70000] = np.arange(1, 70001)
    with pytest.raises(DataError) as info:
        target_picture(labels, np.zeros((300, 300, 3), np.uint8), "instances", source)
    assert str(source) in str(info.value) and "70000 instances" in str(info.value)
    labels.ravel()[:70000] = np.arange(1, 70001) % 65536
    assert target_picture(labels, None, "instances", source).max() == 65535
    mask = target_picture(np.array([[0, 1], [1, 0]], np.uint8), None, "mask", source)
    assert mask.dtype == np.uint8 and mask.tolist() == [[0, 255], [255, 0]]
    classes = target_picture(np.array([[0, 3]], np.uint8), None, "classes", source)
    assert classes.dtype == np.uint8 and classes.tolist() == [[0, 3]]

    two = np.array([[[0.0, 1.0], [1.0, 0.25]]], np.float32)  # 1 x 2 x 2: channel 0 as grey
    assert probability_picture(two).tolist() == [[0, 255]]
    four = np.array([[[0.1, 0.5, 1.0, 0.7]]], np.float32)  # channels 0-2 as RGB, written in BGR order
    assert probability_picture(four).tolist() == [[[255, 128, 26]]]

    empty = box_table("x", {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                            "labels": np.zeros(0, np.int64)})
    path = write_box_table(tmp_path / "boxes.csv", [empty])
    assert path.read_text() == ",".join(BOX_COLUMNS) + "\n"
