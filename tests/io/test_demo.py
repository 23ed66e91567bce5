"""The synthetic demo competition: layout, masks, solution CSV, determinism, safe rewrites."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage

from kseg.codecs.rle import decode
from kseg.core.errors import ConfigError, DataError
from kseg.io import demo

SEED, N_TRAIN, N_TEST = 3, 4, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return demo.write_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", seed=SEED,
                                   n_train=N_TRAIN, n_test=N_TEST)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _is_hex_id(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def test_layout(dataset):
    assert {p.name for p in dataset.iterdir()} == {
        "stage1_train", "stage1_test", "stage1_sample_submission.csv", "stage1_solution.csv",
        "styles.json", ".kseg_demo.json"}
    train_ids = sorted(p.name for p in (dataset / "stage1_train").iterdir())
    test_ids = sorted(p.name for p in (dataset / "stage1_test").iterdir())
    assert len(train_ids) == N_TRAIN and len(test_ids) == N_TEST
    assert all(map(_is_hex_id, train_ids + test_ids)) and not set(train_ids) & set(test_ids)
    for i in train_ids:
        assert {p.name for p in (dataset / "stage1_train" / i).iterdir()} == {"images", "masks"}
        assert [p.name for p in (dataset / "stage1_train" / i / "images").iterdir()] == [f"{i}.png"]
        assert all(_is_hex_id(p.stem) and p.suffix == ".png"
                   for p in (dataset / "stage1_train" / i / "masks").iterdir())
    for i in test_ids:
        assert [p.relative_to(dataset / "stage1_test" / i).as_posix()
                for p in sorted((dataset / "stage1_test" / i).rglob("*"))] == ["images", f"images/{i}.png"]
    lines = (dataset / "stage1_sample_submission.csv").read_text().splitlines()
    assert lines == ["ImageId,EncodedPixels"] + [f"{i},1 1" for i in test_ids]


def test_images_and_masks(dataset):
    low, high = demo.SIZE_RANGE
    for sample_dir in (dataset / "stage1_train").iterdir():
        image = cv2.imread(str(sample_dir / "images" / f"{sample_dir.name}.png"), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert low <= image.shape[0] <= high and low <= image.shape[1] <= high
        covered = np.zeros(image.shape[:2], np.int32)
        mask_paths = sorted((sample_dir / "masks").iterdir())
        assert mask_paths, "every demo training image has at least one nucleus"
        for path in mask_paths:
            mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
            assert set(np.unique(mask)) == {0, 255}
            assert (mask > 0).sum() >= demo.MIN_INSTANCE_AREA
            assert ndimage.label(mask > 0)[1] == 1, f"{path.name} is not one connected piece"
            covered += mask > 0
        assert covered.max() == 1, "nuclei overlap"


def test_masks_match_in_memory_labels(dataset):
    sample = demo.make_demo_image(SEED, "train", 0)
    folder = dataset / "stage1_train" / sample.id
    masks = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) > 0 for p in (folder / "masks").iterdir()]
    expected = [sample.labels == k for k in range(1, sample.labels.max() + 1)]
    assert sorted(m.tobytes() for m in masks) == sorted(m.tobytes() for m in expected)
    written = cv2.imread(str(folder / "images" / f"{sample.id}.png"))[..., ::-1]
    np.testing.assert_array_equal(written, sample.image)


def test_solution_round_trip(dataset):
    lines = (dataset / "stage1_solution.csv").read_text().splitlines()
    assert lines[0] == "ImageId,EncodedPixels"
    rows: dict[str, list[str]] = {}
    for line in lines[1:]:
        image_id, rle = line.split(",")
        rows.setdefault(image_id, []).append(rle)
    assert sorted(rows) == sorted(p.name for p in (dataset / "stage1_test").iterdir())
    for index in range(N_TEST):
        sample = demo.make_demo_image(SEED, "test", index)
        decoded = [decode(rle, sample.labels.shape, order="F") for rle in rows[sample.id]]
        expected = [(sample.labels == k).astype(np.uint8) for k in range(1, sample.labels.max() + 1)]
        assert len(decoded) == len(expected)
        for got, want in zip(decoded, expected):
            np.testing.assert_array_equal(got > 0, want > 0)


def test_empty_test_image_gets_one_empty_row():
    assert demo._solution_lines("ab12", np.zeros((5, 7), np.int32)) == ["ab12,\n"]


def test_styles_recorded_and_both_present(dataset):
    styles = demo.read_demo_styles(dataset)
    all_ids = [p.name for split in ("stage1_train", "stage1_test") for p in (dataset / split).iterdir()]
    assert sorted(styles) == sorted(all_ids)
    train_styles = {styles[p.name] for p in (dataset / "stage1_train").iterdir()}
    assert train_styles == {"fluorescence", "brightfield"}
    marker = json.loads((dataset / ".kseg_demo.json").read_text())
    assert marker["params"] == demo.read_demo_params(dataset)
    assert {record["variant"] for record in marker["images"].values()} <= set(demo.VARIANTS)


def test_every_variant_renders():
    for index, variant in enumerate(demo.VARIANTS):
        sample = demo.make_demo_image(7, "train", index, variant)
        assert sample.image.dtype == np.uint8 and sample.image.shape == (*sample.labels.shape, 3)
        assert sample.labels.dtype == np.int32
        assert np.array_equal(np.unique(sample.labels), np.arange(sample.labels.max() + 1))
        assert sample.style == demo.VARIANTS[variant]
    bright = demo.make_demo_image(7, "train", 0, "he_lavender").image.mean()
    dark = demo.make_demo_image(7, "train", 0, "fluorescence_gray").image.mean()
    assert bright > 120 > 60 > dark


def test_some_nuclei_touch():
    """Clusters press nuclei together: distinct labels must share a boundary somewhere."""
    for index in range(12):
        labels = demo.make_demo_image(SEED, "train", index).labels
        a, b = labels[:, :-1], labels[:, 1:]
        if ((a > 0) & (b > 0) & (a != b)).any():
            return
    pytest.fail("no two nuclei touch in 12 images")


def test_deterministic(dataset, tmp_path):
    again = demo.write_demo_dataset(tmp_path / "again", seed=SEED, n_train=N_TRAIN, n_test=N_TEST)
    assert _tree(again) == _tree(dataset)
    other = demo.write_demo_dataset(tmp_path / "other", seed=SEED + 1, n_train=N_TRAIN, n_test=N_TEST)
    assert set(_tree(other)) != set(_tree(dataset))
    first = demo.make_demo_image(SEED, "train", 0, "fluorescence_gray").image
    assert not np.array_equal(first, demo.make_demo_image(SEED + 1, "train", 0, "fluorescence_gray").image)


def test_second_call_is_a_no_op_and_other_params_need_overwrite(tmp_path):
    root = demo.write_demo_dataset(tmp_path / "d", seed=1, n_train=2, n_test=1)
    marker = root / ".kseg_demo.json"
    stamp = marker.stat().st_mtime_ns
    (root / "keep.txt").write_text("untouched")
    assert demo.write_demo_dataset(root, seed=1, n_train=2, n_test=1) == root
    assert marker.stat().st_mtime_ns == stamp and (root / "keep.txt").exists()

    with pytest.raises(DataError, match="overwrite=True"):
        demo.write_demo_dataset(root, seed=2, n_train=2, n_test=1)
    demo.write_demo_dataset(root, seed=2, n_train=3, n_test=1, overwrite=True)
    assert demo.read_demo_params(root)["seed"] == 2
    assert len(list((root / "stage1_train").iterdir())) == 3 and not (root / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["d"], "staging folders left behind"


def test_refuses_foreign_folder_but_fills_an_empty_one(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(DataError, match="not a demo dataset"):
            demo.write_demo_dataset(foreign, n_train=1, n_test=0, overwrite=overwrite)
    assert (foreign / "notes.txt").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    demo.write_demo_dataset(empty, n_train=1, n_test=0)
    assert demo.read_demo_params(empty)["n_train"] == 1


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def crash(folder, params):
        (folder / "stage1_train").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_write_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        demo.write_demo_dataset(tmp_path / "d", n_train=1, n_test=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [{"seed": -1}, {"n_train": 1.5}, {"n_test": -2}, {"n_train": 0, "n_test": 0},
                                    {"seed": True}])
def test_bad_parameters(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        demo.write_demo_dataset(tmp_path / "d", **kwargs)
