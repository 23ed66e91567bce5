"""Dataset readers: each layout reads back what was written, and each bad input names its file."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from fixtures_datasets import (
    imwrite,
    random_image,
    same_partition,
    write_csv_rle_dataset,
    write_dsb_dataset,
    write_paired_dataset,
)

from kseg.core.errors import ConfigError, DataError, RLEError
from kseg.io.csv_rle import CsvRleReader
from kseg.io.dsb import DsbReader
from kseg.io.paired import PairedReader
from kseg.io.readers import READERS, open_dataset
from kseg.io.sample import read_image, read_mask
from kseg.io.testset import discover_test_ids


def mask_files(root: Path, sample_id: str) -> list[Path]:
    return sorted((root / sample_id / "masks").glob("*.png"))


# --- DSB folder layout ----------------------------------------------------------------------------


def test_dsb_reads_back_rgb_images_and_labels_in_sorted_mask_order(tmp_path):
    truth = write_dsb_dataset(tmp_path / "stage1_train")
    reader = DsbReader(tmp_path / "stage1_train")
    assert reader.kind == "instance" and reader.ids() == sorted(truth)
    for sample_id, (image, labels) in truth.items():
        sample = reader.load(sample_id)
        assert sample.image.shape == (*labels.shape, 3) and sample.image.dtype == np.uint8
        np.testing.assert_array_equal(sample.image, image)  # RGB order, alpha dropped
        assert sample.labels.dtype == np.int32 and sample.mask is None
        assert same_partition(sample.labels, labels)
        for k, path in enumerate(mask_files(reader.root, sample_id), start=1):
            np.testing.assert_array_equal(sample.labels == k, read_mask(path) > 0)
        assert reader.source_files(sample_id)[1:] == mask_files(reader.root, sample_id)


def test_dsb_reader_pickles_and_test_folders_have_no_labels(tmp_path):
    truth = write_dsb_dataset(tmp_path / "stage1_test", n_samples=2, masks=False)
    reader = pickle.loads(pickle.dumps(DsbReader(tmp_path / "stage1_test")))
    for sample_id in reader.ids():
        sample = reader.load(sample_id)
        assert sample.labels is None and sample.target is None
        np.testing.assert_array_equal(sample.image, truth[sample_id][0])


def test_dsb_corrupt_image_names_the_file(tmp_path):
    root = tmp_path / "stage1_train"
    sample_id = next(iter(write_dsb_dataset(root, n_samples=1)))
    image_path = root / sample_id / "images" / f"{sample_id}.png"
    image_path.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(DataError, match=f"{sample_id}.png.*cannot decode"):
        DsbReader(root).load(sample_id)


def test_dsb_mask_of_another_size_names_the_mask(tmp_path):
    root = tmp_path / "stage1_train"
    sample_id = next(iter(write_dsb_dataset(root, n_samples=1)))
    bad = mask_files(root, sample_id)[1]
    imwrite(bad, np.full((10, 10), 255, np.uint8))
    with pytest.raises(DataError, match=f"{bad.name}.*10x10") as error:
        DsbReader(root).load(sample_id)
    assert error.value.path == str(bad)


def test_dsb_overlapping_masks_names_both_files(tmp_path):
    root = tmp_path / "stage1_train"
    sample_id, (_, labels) = next(iter(write_dsb_dataset(root, n_samples=1).items()))
    first, second = mask_files(root, sample_id)[:2]
    imwrite(second, np.maximum(read_mask(first), read_mask(second)))  # second also covers the first
    with pytest.raises(DataError, match="overlap") as error:
        DsbReader(root).load(sample_id)
    assert first.name in str(error.value) and second.name in str(error.value)
    # overlap="first": the shared pixels stay with the earlier mask, the rest reads back as written
    assert same_partition(DsbReader(root, overlap="first").load(sample_id).labels, labels)
    imwrite(second, read_mask(first))
    with pytest.raises(DataError, match=f"{second.name}.*entirely inside {first.name}"):
        DsbReader(root, overlap="first").load(sample_id)


def test_dsb_empty_mask_and_missing_images_folder_are_reported(tmp_path):
    root = tmp_path / "stage1_train"
    first, second = write_dsb_dataset(root, n_samples=2)
    empty = mask_files(root, first)[0]
    imwrite(empty, np.zeros(read_mask(empty).shape, np.uint8))
    with pytest.raises(DataError, match=f"{empty.name}.*empty"):
        DsbReader(root).load(first)
    for path in (root / second / "images").iterdir():
        path.unlink()
    (root / second / "images").rmdir()
    with pytest.raises(DataError, match=f"{second}/images.*no images folder"):
        DsbReader(root).load(second)


def test_dsb_parent_folder_gets_a_hint(tmp_path):
    write_dsb_dataset(tmp_path / "data" / "stage1_train", n_samples=1)
    with pytest.raises(DataError, match="stage1_train"):
        DsbReader(tmp_path / "data").ids()


# --- paired folders -------------------------------------------------------------------------------


def test_paired_binary_png_masks_become_zero_one(tmp_path):
    truth = write_paired_dataset(tmp_path / "images", tmp_path / "masks")
    reader = PairedReader(tmp_path / "images", tmp_path / "masks")
    assert reader.kind == "semantic" and reader.ids() == sorted(truth)
    for stem, (image, mask) in truth.items():
        sample = reader.load(stem)
        np.testing.assert_array_equal(sample.image, image)
        assert sample.mask.dtype == np.uint8 and sample.labels is None
        np.testing.assert_array_equal(sample.mask, mask)


def test_paired_jpg_images_with_gif_masks_named_stem_mask(tmp_path):
    pytest.importorskip("PIL", reason="GIF masks need Pillow to write them")
    truth = write_paired_dataset(tmp_path / "train", tmp_path / "train_masks", image_ext=".jpg",
                                 mask_ext=".gif", mask_suffix="_mask")
    for suffix in ("_mask", "{stem}_mask"):
        reader = PairedReader(tmp_path / "train", tmp_path / "train_masks", mask_suffix=suffix)
        assert reader.ids() == sorted(truth)
        for stem, (image, mask) in truth.items():
            sample = reader.load(stem)
            assert sample.image.shape == image.shape  # JPEG is lossy: compare shapes only
            np.testing.assert_array_equal(sample.mask, mask)
            assert [p.name for p in reader.source_files(stem)] == [f"{stem}.jpg", f"{stem}_mask.gif"]


def test_paired_colour_palette_masks_keep_their_indices(tmp_path):
    pil = pytest.importorskip("PIL.Image", reason="palette masks need Pillow to write them")
    imwrite(tmp_path / "images" / "a.png", np.zeros((4, 5, 3), np.uint8))
    values = np.array([[0, 1, 2, 2, 0]] * 4, np.uint8)
    palette = pil.frombytes("P", (5, 4), values.tobytes())
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0])  # VOC-like colours
    (tmp_path / "masks").mkdir()
    palette.save(tmp_path / "masks" / "a.png")
    sample = PairedReader(tmp_path / "images", tmp_path / "masks", classes=3).load("a")
    np.testing.assert_array_equal(sample.mask, values)


def test_paired_class_index_masks_and_grey_level_classes(tmp_path):
    truth = write_paired_dataset(tmp_path / "images", tmp_path / "masks", classes=4, grey=True)
    reader = PairedReader(tmp_path / "images", tmp_path / "masks", classes=4)
    for stem, (image, mask) in truth.items():
        sample = reader.load(stem)
        assert sample.image.shape == (*mask.shape, 1)
        np.testing.assert_array_equal(sample.mask, mask)
    levels = PairedReader(tmp_path / "images", tmp_path / "masks", classes=[0, 2, 1, 3])
    np.testing.assert_array_equal(levels.load("img0").mask, np.array([0, 2, 1, 3])[truth["img0"][1]])
    with pytest.raises(DataError, match="img0.png.*not classes 0..1"):
        PairedReader(tmp_path / "images", tmp_path / "masks", classes=2).load("img0")


def test_paired_binary_mask_given_a_class_count_gets_a_hint(tmp_path):
    write_paired_dataset(tmp_path / "images", tmp_path / "masks", n=1)
    with pytest.raises(DataError, match="255.*leave classes unset"):
        PairedReader(tmp_path / "images", tmp_path / "masks", classes=3).load("img0")


def test_paired_instances_label_connected_components(tmp_path):
    from scipy import ndimage

    truth = write_paired_dataset(tmp_path / "images", tmp_path / "masks")
    reader = PairedReader(tmp_path / "images", tmp_path / "masks", instances=True)
    assert reader.kind == "instance"
    for stem, (_, mask) in truth.items():
        labels = reader.load(stem).labels
        assert labels.dtype == np.int32
        assert same_partition(labels, ndimage.label(mask, structure=np.ones((3, 3)))[0])


def test_paired_missing_and_orphan_masks_are_listed(tmp_path):
    write_paired_dataset(tmp_path / "images", tmp_path / "masks")
    (tmp_path / "masks" / "img1.png").rename(tmp_path / "masks" / "other.png")
    reader = PairedReader(tmp_path / "images", tmp_path / "masks")
    with pytest.raises(DataError) as error:
        reader.ids()
    message = str(error.value)
    assert "img1.png" in message and "without a mask" in message and "other.png" in message
    with pytest.raises(DataError, match="img1.png.*has no mask"):
        reader.load("img1")


def test_paired_mask_of_another_size_and_ambiguous_stems(tmp_path):
    write_paired_dataset(tmp_path / "images", tmp_path / "masks")
    imwrite(tmp_path / "masks" / "img2.png", np.zeros((7, 9), np.uint8))
    reader = PairedReader(tmp_path / "images", tmp_path / "masks")
    with pytest.raises(DataError, match="masks/img2.png.*9x7"):
        reader.load("img2")
    imwrite(tmp_path / "images" / "img0.jpg", random_image(np.random.default_rng(1), (20, 28)))
    with pytest.raises(DataError, match="img0.jpg"):
        reader.ids()


def test_paired_masks_beside_their_images(tmp_path):
    """Ultrasound Nerve Segmentation: train/1_1.tif + train/1_1_mask.tif."""
    truth = write_paired_dataset(tmp_path / "train", tmp_path / "train", image_ext=".tif", mask_ext=".tif",
                                 mask_suffix="_mask", grey=True)
    reader = PairedReader(tmp_path / "train", tmp_path / "train", mask_suffix="_mask")
    assert reader.ids() == sorted(truth)
    np.testing.assert_array_equal(reader.load("img1").mask, truth["img1"][1])
    with pytest.raises(ConfigError, match="mask_suffix"):
        PairedReader(tmp_path / "train", tmp_path / "train").ids()


def test_paired_test_folder_without_masks(tmp_path):
    write_paired_dataset(tmp_path / "images", tmp_path / "masks", n=2)
    reader = PairedReader(tmp_path / "images")
    assert reader.ids() == ["img0", "img1"]
    assert reader.load("img0").target is None


def test_isbi_membrane_through_paired_reader(shared_data):
    root = shared_data / "isbi2012_membrane"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    reader = PairedReader(root / "images", root / "masks")
    ids = reader.ids()
    assert len(ids) == 20
    sample = reader.load(ids[0])
    assert sample.image.shape == (512, 512, 1) and sample.image.dtype == np.uint8
    assert sample.mask.shape == (512, 512) and sample.mask.dtype == np.uint8
    assert set(np.unique(sample.mask)) == {0, 1}
    assert 0.1 < float((sample.mask == 0).mean()) < 0.35  # membrane is class 0


def test_dsb2018_sample_labels_match_mask_files(shared_data):
    root = shared_data / "dsb2018_stage1_train_sample" / "stage1_train"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    reader = DsbReader(root)
    ids = reader.ids()
    assert len(ids) > 2
    for sample_id in ids[:2]:
        sample = reader.load(sample_id)
        n_masks = len(list((root / sample_id / "masks").glob("*.png")))
        assert sample.image.ndim == 3 and sample.image.shape[2] == 3
        assert sample.labels.max() == n_masks
        assert len(np.unique(sample.labels)) == n_masks + 1


# --- image folder + CSV of RLE rows ---------------------------------------------------------------


def test_csv_airbus_style_instances_and_empty_rows(tmp_path):
    truth = write_csv_rle_dataset(tmp_path / "train_v2", tmp_path / "train.csv", n=4, empty_images=1)
    reader = CsvRleReader(tmp_path / "train_v2", tmp_path / "train.csv")
    assert reader.ids() == list(truth)  # CSV order, ids with their extension
    for image_id, (image, labels) in truth.items():
        sample = reader.load(image_id)
        assert sample.image.shape == (*labels.shape, 3) and sample.labels.dtype == np.int32
        assert sample.labels.flags.c_contiguous and same_partition(sample.labels, labels)
    assert reader.load(list(truth)[-1]).labels.max() == 0  # the "no ship" row
    assert reader.source_files(list(truth)[0])[-1] == tmp_path / "train.csv"


def test_csv_dsb_style_ids_without_extension_and_row_major_order(tmp_path):
    truth = write_csv_rle_dataset(tmp_path / "images", tmp_path / "labels.csv", image_ext=".png",
                                  with_extension=False, order="C", empty_images=0)
    reader = pickle.loads(pickle.dumps(CsvRleReader(tmp_path / "images", tmp_path / "labels.csv", order="C")))
    assert reader.ids() == list(truth)
    for image_id, (image, labels) in truth.items():
        sample = reader.load(image_id)
        np.testing.assert_array_equal(sample.image, image)
        assert same_partition(sample.labels, labels)


def test_csv_rows_resolve_dsb_folders(tmp_path):
    truth = write_dsb_dataset(tmp_path / "stage1_train", n_samples=2)
    from kseg.codecs.rle import encode

    rows = ["ImageId,EncodedPixels"] + [f"{i},{encode(labels == k)}" for i, (_, labels) in truth.items()
                                        for k in range(1, labels.max() + 1)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    reader = CsvRleReader(tmp_path / "stage1_train", tmp_path / "labels.csv")
    assert reader.ids() == list(truth)
    for sample_id, (_, labels) in truth.items():
        assert same_partition(reader.load(sample_id).labels, labels)


def test_csv_severstal_class_rows_and_unlisted_images(tmp_path):
    truth = write_csv_rle_dataset(tmp_path / "train_images", tmp_path / "train.csv", n=4, severstal=True,
                                  empty_images=1)
    listed, unlisted = list(truth)[:-1], list(truth)[-1]
    reader = CsvRleReader(tmp_path / "train_images", tmp_path / "train.csv", kind="semantic")
    assert reader.kind == "semantic" and reader.ids() == listed + [unlisted]
    for image_id, (_, classes) in truth.items():
        sample = reader.load(image_id)
        assert sample.mask.dtype == np.uint8 and sample.labels is None
        np.testing.assert_array_equal(sample.mask, classes)
    assert not reader.load(unlisted).mask.any()
    excluding = CsvRleReader(tmp_path / "train_images", tmp_path / "train.csv", kind="semantic", unlisted="exclude")
    assert excluding.ids() == listed
    with pytest.raises(DataError, match="not listed"):
        excluding.load(unlisted)


def test_csv_old_severstal_image_class_column_and_multilabel(tmp_path):
    truth = write_csv_rle_dataset(tmp_path / "images", tmp_path / "train.csv", n=2, severstal=True, empty_images=0)
    from kseg.codecs.rle import encode

    first, (_, classes) = next(iter(truth.items()))
    old = ["ImageId_ClassId,EncodedPixels"]
    for class_id in range(1, 5):
        old.append(f"{first}_{class_id},{encode(classes == class_id)}")
    (tmp_path / "old.csv").write_text("\n".join(old) + "\n")
    reader = CsvRleReader(tmp_path / "images", tmp_path / "old.csv", kind="semantic", unlisted="exclude")
    assert reader.ids() == [first]
    np.testing.assert_array_equal(reader.load(first).mask, classes)
    # a pixel claimed by two classes: an error for a class-index mask, fine for multi-label
    overlapping = old + [f"{first}_2,{encode(classes == 0)}", f"{first}_1,{encode(classes == 0)}"]
    (tmp_path / "overlap.csv").write_text("\n".join(overlapping) + "\n")
    with pytest.raises(DataError, match="overlap.csv line 7.*overlaps class 2 of line 6"):
        CsvRleReader(tmp_path / "images", tmp_path / "overlap.csv", kind="semantic").load(first)
    multi = CsvRleReader(tmp_path / "images", tmp_path / "overlap.csv", kind="semantic", multilabel=True,
                         num_classes=4).load(first).mask
    assert multi.shape == (*classes.shape, 4)
    np.testing.assert_array_equal(multi[..., 2], (classes == 3).astype(np.uint8))
    np.testing.assert_array_equal(multi[..., 0], ((classes == 1) | (classes == 0)).astype(np.uint8))


def test_csv_missing_image_names_the_id_and_line(tmp_path):
    truth = write_csv_rle_dataset(tmp_path / "images", tmp_path / "train.csv", n=3, empty_images=0)
    victim = list(truth)[1]
    (tmp_path / "images" / victim).unlink()
    reader = CsvRleReader(tmp_path / "images", tmp_path / "train.csv")
    line = 2 + 3  # header, then three rows of the first image
    with pytest.raises(DataError, match=f"{victim}.*line {line}"):
        reader.ids()
    with pytest.raises(DataError, match=f"train.csv line {line}.*{victim}"):
        reader.load(victim)


def test_csv_malformed_rle_names_the_line(tmp_path):
    truth = write_csv_rle_dataset(tmp_path / "images", tmp_path / "train.csv", n=2, empty_images=0)
    lines = (tmp_path / "train.csv").read_text().splitlines()
    image_id = lines[3].split(",")[0]
    lines[3] = f"{image_id},5 3 7"  # odd number of values
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    reader = CsvRleReader(tmp_path / "images", tmp_path / "train.csv")
    with pytest.raises(RLEError, match="train.csv line 4.*3 tokens"):
        reader.load(image_id)
    assert reader.load(list(truth)[1]).labels.max() == 3  # other images still load
    lines[3] = lines[2]  # the same ship twice: instances overlap
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(RLEError, match="line 4.*overlaps instance 2 .*line 3"):
        CsvRleReader(tmp_path / "images", tmp_path / "train.csv").load(image_id)


def test_csv_reader_works_in_joblib_workers(tmp_path):
    joblib = pytest.importorskip("joblib")
    truth = write_csv_rle_dataset(tmp_path / "images", tmp_path / "train.csv", n=4)
    reader = CsvRleReader(tmp_path / "images", tmp_path / "train.csv")
    counts = joblib.Parallel(n_jobs=2, backend="loky")(
        joblib.delayed(lambda r, i: int(r.load(i).labels.max()))(reader, i) for i in reader.ids())
    assert counts == [int(labels.max()) for _, labels in truth.values()]


def test_csv_bad_class_and_missing_columns(tmp_path):
    write_csv_rle_dataset(tmp_path / "images", tmp_path / "train.csv", n=1, empty_images=0, severstal=True)
    text = (tmp_path / "train.csv").read_text().splitlines()
    image_id = text[1].split(",")[0]
    (tmp_path / "zero.csv").write_text("\n".join(text + [f"{image_id},0,1 2"]) + "\n")
    with pytest.raises(DataError, match="zero.csv.*line 5: class '0'"):
        CsvRleReader(tmp_path / "images", tmp_path / "zero.csv", kind="semantic").ids()
    (tmp_path / "cols.csv").write_text("name,pixels\na.jpg,1 2\n")
    with pytest.raises(DataError, match="cols.csv.*no image id column.*'name', 'pixels'"):
        CsvRleReader(tmp_path / "images", tmp_path / "cols.csv").ids()


# --- test-set discovery ---------------------------------------------------------------------------


def test_discover_dsb_and_flat_test_folders(tmp_path):
    truth = write_dsb_dataset(tmp_path / "stage1_test", n_samples=3, masks=False)
    found = discover_test_ids(tmp_path / "stage1_test")
    assert [i for i, _ in found] == sorted(truth)
    assert all(read_image(p).shape[2] == 3 for _, p in found)
    write_paired_dataset(tmp_path / "test", tmp_path / "unused", n=2, image_ext=".jpg")
    assert [i for i, _ in discover_test_ids(tmp_path / "test")] == ["img0", "img1"]
    assert [i for i, _ in discover_test_ids(tmp_path / "test", id_style="name")] == ["img0.jpg", "img1.jpg"]


def test_discover_from_sample_submission(tmp_path):
    write_paired_dataset(tmp_path / "test_v2", tmp_path / "unused", n=3, image_ext=".jpg")
    (tmp_path / "sample.csv").write_text("ImageId,EncodedPixels\nimg2.jpg,1 2\nimg0.jpg,1 2\nimg2.jpg,\n")
    found = discover_test_ids(tmp_path / "test_v2", tmp_path / "sample.csv")
    assert found == [("img2.jpg", tmp_path / "test_v2" / "img2.jpg"), ("img0.jpg", tmp_path / "test_v2" / "img0.jpg")]
    (tmp_path / "old.csv").write_text("ImageId_ClassId,EncodedPixels\nimg1.jpg_1,\nimg1.jpg_2,\nimg0_1,\n")
    assert [i for i, _ in discover_test_ids(tmp_path / "test_v2", tmp_path / "old.csv")] == ["img1.jpg", "img0"]
    (tmp_path / "bad.csv").write_text("id,rle_mask\nimg1,\nnope,\n")
    with pytest.raises(DataError, match=r"'nope'") as error:
        discover_test_ids(tmp_path / "test_v2", tmp_path / "bad.csv")
    assert str(tmp_path / "test_v2") in str(error.value)


# --- registry -------------------------------------------------------------------------------------


def test_open_dataset_builds_each_layout_and_checks_options(tmp_path):
    write_dsb_dataset(tmp_path / "dsb", n_samples=1)
    write_paired_dataset(tmp_path / "images", tmp_path / "masks", n=1)
    assert set(READERS) >= {"dsb", "paired", "csv_rle"}
    assert isinstance(open_dataset("dsb", tmp_path / "dsb"), DsbReader)
    paired = open_dataset("paired", tmp_path / "images", masks=tmp_path / "masks", binary_threshold=10)
    assert isinstance(paired, PairedReader) and paired.binary_threshold == 10
    csv = open_dataset("csv_rle", tmp_path / "images", masks=tmp_path / "x.csv", kind="semantic")
    assert isinstance(csv, CsvRleReader) and csv.kind == "semantic"
    with pytest.raises(ConfigError, match="known layouts: box_csv, coco, csv_rle, dsb, paired, voc"):
        open_dataset("coco-ish", tmp_path)
    with pytest.raises(ConfigError, match="mask_sufix.*mask_suffix"):
        open_dataset("paired", tmp_path / "images", masks=tmp_path / "masks", mask_sufix="_mask")
    with pytest.raises(ConfigError, match="needs dataset.masks"):
        open_dataset("csv_rle", tmp_path / "images")
    with pytest.raises(ConfigError, match="takes no dataset.masks"):
        open_dataset("dsb", tmp_path / "dsb", masks=tmp_path / "masks")


# -- masks of wider types -------------------------------------------------------------------------
def test_a_16bit_binary_mask_reads_as_an_8bit_binary_mask(tmp_path):
    import cv2

    from kseg.io.sample import read_mask

    mask = np.zeros((7, 5), np.uint16)
    mask[2:5, 1:3] = 65535
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    got = read_mask(tmp_path / "m.png")
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.where(mask > 0, 255, 0))


def test_a_16bit_mask_with_more_than_two_large_values_is_refused_by_name(tmp_path):
    import cv2

    from kseg.core.errors import DataError
    from kseg.io.sample import read_mask

    mask = np.zeros((4, 4), np.uint16)
    mask[0, 0], mask[1, 1] = 300, 600
    cv2.imwrite(str(tmp_path / "three.png"), mask)
    with pytest.raises(DataError, match=r"three\.png.*600 \(3 distinct\)"):
        read_mask(tmp_path / "three.png")


def test_real_tgs_rows_read_as_their_csv_says(shared_data):
    """The competition's 16-bit 0/65535 masks, read by the paired reader, equal train.csv's RLE."""
    import pandas as pd

    from kseg.codecs import rle
    from kseg.io.readers import open_dataset

    root = shared_data / "tgs_salt_sample"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    reader = open_dataset("paired", root / "train" / "images", masks=root / "train" / "masks")
    table = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False).set_index("id")
    ids = list(reader.ids())
    assert len(ids) == 100
    empty = 0
    for sample_id in ids:
        sample = reader.load(sample_id)
        assert sample.image.shape[:2] == (101, 101)
        truth = rle.decode(table.loc[sample_id, "rle_mask"], (101, 101), "F")
        np.testing.assert_array_equal(np.asarray(sample.target) > 0, truth > 0, err_msg=sample_id)
        empty += int(not truth.any())
    assert empty == 41  # as the data's README says


def test_macos_zip_leftovers_are_not_samples(tmp_path):
    """A zip made on macOS unpacks with ``__MACOSX/`` (resource forks ``._x.png`` mirroring the
    tree) and ``._x.png`` files beside the images: none of them is a sample or a test image."""
    truth = write_dsb_dataset(tmp_path / "train", n_samples=2)
    fork = b"\x00\x05\x16\x07" + bytes(60)  # AppleDouble header, not an image
    for sample_id in truth:
        for folder in (tmp_path / "train" / "__MACOSX" / sample_id / "images", tmp_path / "train" / sample_id / "images"):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"._{sample_id}.png").write_bytes(fork)
    reader = DsbReader(tmp_path / "train")
    assert reader.ids() == sorted(truth)
    np.testing.assert_array_equal(reader.load(sorted(truth)[0]).image, truth[sorted(truth)[0]][0])
    assert [i for i, _ in discover_test_ids(tmp_path / "train", layout="dsb")] == sorted(truth)

    flat = tmp_path / "flat"
    write_paired_dataset(flat / "images", flat / "masks", n=2)
    (flat / "images" / "__MACOSX").mkdir()
    (flat / "images" / "__MACOSX" / "._0.png").write_bytes(fork)
    (flat / "images" / "._0.png").write_bytes(fork)
    listed = discover_test_ids(flat / "images")
    assert len(listed) == 2 and all(not p.name.startswith(".") for _, p in listed)
    assert len(PairedReader(flat / "images", flat / "masks").ids()) == 2
