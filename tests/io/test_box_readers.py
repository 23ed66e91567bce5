"""Box annotations: VOC / COCO / CSV readers give exact corner boxes, bad boxes name their file,
and boxes derived from instance masks enclose them tightly."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from fixtures_datasets import imwrite, random_image
from hypothesis import given, settings
from hypothesis import strategies as st

from kseg.core.errors import DataError
from kseg.io.boxes import (
    BoxCsvReader,
    BoxSample,
    CocoBoxReader,
    VocBoxReader,
    boxes_from_labels,
    instance_boxes,
)
from kseg.io.dsb import DsbReader
from kseg.io.readers import MASKS_ROLE, READERS, open_dataset
from kseg.io.sample import Sample, read_mask

RNG = np.random.default_rng(0)


def check_box_arrays(sample: BoxSample) -> None:
    k = len(sample.boxes)
    assert sample.boxes.dtype == np.float32 and sample.boxes.shape == (k, 4)
    assert sample.labels.dtype == np.int64 and sample.labels.shape == (k,)
    assert sample.ignore.dtype == bool and sample.ignore.shape == (k,)
    assert (sample.labels >= 1).all()


# --- boxes_from_labels ------------------------------------------------------------------------------


def test_boxes_from_labels_hand_computed():
    labels = np.zeros((6, 10), np.int32)
    labels[1:3, 3:8] = 7  # rows 1..2, columns 3..7 -> (3, 1, 8, 3)
    labels[5, 0] = 2  # one pixel -> (0, 5, 1, 6)
    labels[0, 9] = 40
    labels[4, 9] = 40  # two pieces of one id: one box (9, 0, 10, 5)
    boxes, ids = boxes_from_labels(labels)
    assert ids.tolist() == [2, 7, 40]
    assert boxes.dtype == np.float32
    np.testing.assert_array_equal(boxes, [[0, 5, 1, 6], [3, 1, 8, 3], [9, 0, 10, 5]])


def test_boxes_from_labels_empty_sparse_and_bad_input():
    boxes, ids = boxes_from_labels(np.zeros((4, 5), np.uint16))
    assert boxes.shape == (0, 4) and ids.shape == (0,)
    labels = np.zeros((4, 5), np.int64)
    labels[1, 2:4] = 10**12  # ids far beyond the pixel count take the renumbering path
    labels[3, 0] = 5
    boxes, ids = boxes_from_labels(labels)
    assert ids.tolist() == [5, 10**12]
    np.testing.assert_array_equal(boxes, [[0, 3, 1, 4], [2, 1, 4, 2]])
    with pytest.raises(ValueError, match=">= 0"):
        boxes_from_labels(-labels)
    with pytest.raises(ValueError, match="integers"):
        boxes_from_labels(labels.astype(float))


@st.composite
def painted_rectangles(draw):
    """Disjoint rectangles, one per chosen cell of a 4 x 4 grid of 7 x 9 cells, with random ids."""
    cells = draw(st.lists(st.integers(0, 15), min_size=0, max_size=16, unique=True))
    ids = draw(st.lists(st.one_of(st.integers(1, 40), st.integers(1, 2**40)), min_size=len(cells),
                        max_size=len(cells), unique=True))
    truth = {}
    for cell, instance in zip(cells, ids):
        row, col = divmod(cell, 4)
        y0 = row * 7 + draw(st.integers(0, 5))
        x0 = col * 9 + draw(st.integers(0, 7))
        y1 = draw(st.integers(y0 + 1, row * 7 + 7))
        x1 = draw(st.integers(x0 + 1, col * 9 + 9))
        truth[instance] = (x0, y0, x1, y1)
    return truth


@settings(max_examples=60, deadline=None)
@given(painted_rectangles())
def test_boxes_from_labels_gives_back_painted_rectangles(truth):
    labels = np.zeros((28, 36), np.int64)
    for instance, (x0, y0, x1, y1) in truth.items():
        labels[y0:y1, x0:x1] = instance
    boxes, ids = boxes_from_labels(labels)
    assert ids.tolist() == sorted(truth)
    assert {i: tuple(b) for i, b in zip(ids.tolist(), boxes.tolist())} == truth


def test_instance_boxes_of_a_sample():
    labels = np.zeros((8, 8), np.int32)
    labels[2:4, 1:6] = 1
    labels[6:8, 6:8] = 3
    image = random_image(RNG, (8, 8))
    sample = instance_boxes(Sample("a", image, labels=labels, path="a.png"))
    check_box_arrays(sample)
    np.testing.assert_array_equal(sample.boxes, [[1, 2, 6, 4], [6, 6, 8, 8]])
    assert sample.labels.tolist() == [1, 1] and not sample.ignore.any()
    assert sample.image is image and sample.path == "a.png" and sample.id == "a"
    with pytest.raises(DataError, match="b.png.*no instance label image"):
        instance_boxes(Sample("b", image, path="b.png"))


# --- Pascal VOC ----------------------------------------------------------------------------------------


def voc_xml(filename: str, width: int, height: int, objects) -> str:
    parts = [f"<annotation><folder>VOC</folder><filename>{filename}</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, (xmin, ymin, xmax, ymax), difficult in objects:
        parts.append(f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
                     f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>"
                     f"<part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax>"
                     f"<ymax>2</ymax></bndbox></part></object>")
    return "".join(parts) + "</annotation>"


def write_voc(root: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    images, annotations = root / "JPEGImages", root / "Annotations"
    annotations.mkdir(parents=True)
    written = {}
    for stem, shape in (("2007_000001", (30, 40)), ("2007_000002", (20, 25))):
        image = random_image(RNG, shape)
        imwrite(images / f"{stem}.png", image)
        written[stem] = image
    # VOC 1-based inclusive: pixels 3..7 (0-based) are xmin=4, xmax=8
    (annotations / "2007_000001.xml").write_text(voc_xml("2007_000001.png", 40, 30, [
        ("dog", (4, 2, 8, 10), 0),
        ("person", (1, 1, 40, 30), 1),  # the whole image
        ("dog", (0, 5, 41, 6), 0),  # VOC files with 0-based values: one pixel out, clipped
    ]))
    (annotations / "2007_000002.xml").write_text(voc_xml("2007_000002.png", 25, 20, []))
    return images, annotations, written


def test_voc_reader_converts_one_based_inclusive_boxes(tmp_path):
    images, annotations, written = write_voc(tmp_path)
    reader = VocBoxReader(images, annotations)
    assert reader.kind == "boxes" and reader.ids() == ["2007_000001", "2007_000002"]
    assert reader.class_names == ["background", "dog", "person"]
    sample = reader.load("2007_000001")
    check_box_arrays(sample)
    np.testing.assert_array_equal(sample.image, written["2007_000001"])
    np.testing.assert_array_equal(sample.boxes, [[3, 1, 8, 10], [0, 0, 40, 30], [0, 4, 40, 6]])
    assert sample.labels.tolist() == [1, 2, 1]
    assert sample.ignore.tolist() == [False, True, False]
    assert sample.path == str(images / "2007_000001.png")
    assert reader.source_files("2007_000001") == [images / "2007_000001.png", annotations / "2007_000001.xml"]
    empty = reader.load("2007_000002")
    check_box_arrays(empty)
    assert empty.boxes.shape == (0, 4)
    # a pickled reader keeps its (discovered) classes and loads the same
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone.load("2007_000001").boxes, sample.boxes)


def test_voc_given_class_names_and_unknown_class(tmp_path):
    images, annotations, _ = write_voc(tmp_path)
    reader = VocBoxReader(images, annotations, class_names=["person", "cat", "dog"])
    assert reader.class_names == ["background", "person", "cat", "dog"]
    assert reader.load("2007_000001").labels.tolist() == [3, 1, 3]
    xml = annotations / "2007_000001.xml"
    with pytest.raises(DataError, match=r"2007_000001\.xml object 1 \('dog'\).*unknown class 'dog'") as error:
        VocBoxReader(images, annotations, class_names=["person"]).load("2007_000001")
    assert str(xml) in str(error.value)


def test_voc_bad_boxes_and_missing_files_name_the_file(tmp_path):
    images, annotations, _ = write_voc(tmp_path)
    xml = annotations / "2007_000001.xml"
    xml.write_text(voc_xml("2007_000001.png", 40, 30, [("dog", (4, 2, 8, 10), 0), ("cat", (10, 3, 43, 9), 0)]))
    with pytest.raises(DataError, match=r"object 2 \('cat'.*outside the 40x30 image") as error:
        VocBoxReader(images, annotations).load("2007_000001")
    assert str(xml) in str(error.value) and "[9, 2, 43, 9]" in str(error.value)
    xml.write_text(voc_xml("2007_000001.png", 40, 30, [("dog", (8, 2, 8, 10), 0)]))  # one column: fine
    np.testing.assert_array_equal(VocBoxReader(images, annotations).load("2007_000001").boxes, [[7, 1, 8, 10]])
    xml.write_text(voc_xml("2007_000001.png", 40, 30, [("dog", (8, 2, 6, 10), 0)]))
    with pytest.raises(DataError, match="non-positive width") as error:
        VocBoxReader(images, annotations).load("2007_000001")
    assert str(xml) in str(error.value)
    xml.write_text(voc_xml("2007_000001.png", 41, 30, []))
    with pytest.raises(DataError, match="41x30 but it is 40x30"):
        VocBoxReader(images, annotations).load("2007_000001")
    xml.write_text(voc_xml("gone.jpg", 40, 30, []))
    (images / "2007_000001.png").unlink()
    with pytest.raises(DataError, match="image file does not exist") as error:
        VocBoxReader(images, annotations).load("2007_000001")
    assert error.value.path == str(images / "gone.jpg")
    with pytest.raises(DataError, match="annotation file does not exist"):
        VocBoxReader(images, annotations).load("2007_000003")
    with pytest.raises(DataError, match="annotations folder does not exist"):
        VocBoxReader(images, tmp_path / "nowhere").ids()


# --- COCO ----------------------------------------------------------------------------------------------


def write_coco(root: Path) -> tuple[Path, Path, dict]:
    images = root / "train2017"
    shapes = {"000000000009": (30, 40), "000000000025": (20, 30), "000000000030": (10, 10)}
    for stem, shape in shapes.items():
        imwrite(images / f"{stem}.jpg", random_image(RNG, shape))
    data = {
        "images": [{"id": 9, "file_name": "000000000009.jpg", "width": 40, "height": 30},
                   {"id": 25, "file_name": "000000000025.jpg", "width": 30, "height": 20},
                   {"id": 30, "file_name": "000000000030.jpg", "width": 10, "height": 10}],
        "categories": [{"id": 18, "name": "dog", "supercategory": "animal"},
                       {"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 90, "name": "toothbrush", "supercategory": "indoor"}],
        "annotations": [
            {"id": 101, "image_id": 9, "category_id": 18, "bbox": [3.0, 1.0, 5.0, 9.0], "iscrowd": 0},
            {"id": 102, "image_id": 9, "category_id": 1, "bbox": [10.5, 2.25, 20.0, 27.75], "iscrowd": 1},
            {"id": 103, "image_id": 25, "category_id": 90, "bbox": [-0.5, 0, 30.8, 20], "iscrowd": 0},
        ],
    }
    json_path = root / "annotations" / "instances_train2017.json"
    json_path.parent.mkdir(parents=True)
    json_path.write_text(json.dumps(data))
    return images, json_path, data


def test_coco_reader_maps_categories_and_crowds(tmp_path):
    images, json_path, _ = write_coco(tmp_path)
    reader = CocoBoxReader(images, json_path)
    assert reader.kind == "boxes"
    assert reader.ids() == ["000000000009", "000000000025", "000000000030"]
    assert reader.class_names == ["background", "person", "dog", "toothbrush"]  # by category id
    sample = reader.load("000000000009")
    check_box_arrays(sample)
    assert sample.image.shape == (30, 40, 3)
    np.testing.assert_array_equal(sample.boxes, [[3, 1, 8, 10], [10.5, 2.25, 30.5, 30]])
    assert sample.labels.tolist() == [2, 1] and sample.ignore.tolist() == [False, True]
    clipped = reader.load("000000000025")
    np.testing.assert_allclose(clipped.boxes, [[0, 0, 30, 20]])
    assert clipped.labels.tolist() == [3]
    assert reader.load("000000000030").boxes.shape == (0, 4)
    assert reader.source_files("000000000009") == [images / "000000000009.jpg", json_path]


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"][1].update(category_id=2), "annotation id 102.*category_id 2"),
    (lambda d: d["annotations"][2].update(image_id=7), "annotation id 103.*image_id 7"),
    (lambda d: d["annotations"][0].update(bbox=[3, 1, 0, 9]), "annotation id 101.*non-positive width"),
    (lambda d: d["annotations"][0].update(bbox=[3, 1, 5, 40]), "annotation id 101.*outside the 40x30 image"),
    (lambda d: d["annotations"][0].update(bbox="3159"), "annotation id 101.*not \\[x, y, width, height\\]"),
])
def test_coco_errors_name_the_json_and_annotation(tmp_path, change, message):
    images, json_path, data = write_coco(tmp_path)
    change(data)
    json_path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=message) as error:
        reader = CocoBoxReader(images, json_path)
        reader.ids()
        reader.load("000000000009")
    assert str(json_path) in str(error.value)


def test_coco_missing_image_and_json(tmp_path):
    images, json_path, _ = write_coco(tmp_path)
    (images / "000000000025.jpg").unlink()
    with pytest.raises(DataError, match="does not exist") as error:
        CocoBoxReader(images, json_path).load("000000000025")
    assert error.value.path == str(images / "000000000025.jpg")
    with pytest.raises(DataError, match="does not exist") as error:
        CocoBoxReader(images, tmp_path / "missing.json").ids()
    assert error.value.path == str(tmp_path / "missing.json")


# --- CSV of boxes (Global Wheat Detection) -------------------------------------------------------------


def write_wheat(root: Path, rows: list[str] | None = None) -> tuple[Path, Path]:
    images = root / "train"
    for stem in ("b6ab77fd7", "b53afdf5c", "7b72ea0fb"):
        imwrite(images / f"{stem}.jpg", random_image(RNG, (32, 48)))
    rows = rows if rows is not None else [
        'b6ab77fd7,48,32,"[3.0, 1.0, 5.0, 9.0]",usask_1',
        'b53afdf5c,48,32,"[0.0, 22.5, 48.0, 10.0]",arvalis_1',
        'b6ab77fd7,48,32,"[40, 30, 8.9, 2.6]",usask_1',  # 0.9 px out on x and 0.6 on y: clipped
    ]
    csv_path = root / "train.csv"
    csv_path.write_text("\n".join(["image_id,width,height,bbox,source", *rows]) + "\n")
    return images, csv_path


def test_box_csv_reader_wheat_layout(tmp_path):
    images, csv_path = write_wheat(tmp_path)
    reader = BoxCsvReader(images, csv_path)
    assert reader.kind == "boxes" and reader.class_names == ["background", "object"]
    assert reader.ids() == ["7b72ea0fb", "b53afdf5c", "b6ab77fd7"]
    sample = reader.load("b6ab77fd7")
    check_box_arrays(sample)
    np.testing.assert_array_equal(sample.boxes, [[3, 1, 8, 10], [40, 30, 48, 32]])
    assert sample.labels.tolist() == [1, 1] and not sample.ignore.any()
    np.testing.assert_array_equal(reader.load("b53afdf5c").boxes, [[0, 22.5, 48, 32]])
    no_rows = reader.load("7b72ea0fb")  # in the folder, not in the CSV: no wheat head
    check_box_arrays(no_rows)
    assert no_rows.boxes.shape == (0, 4) and no_rows.image.shape == (32, 48, 3)
    assert reader.source_files("b6ab77fd7") == [images / "b6ab77fd7.jpg", csv_path]
    assert BoxCsvReader(images, csv_path, class_name="wheat").class_names == ["background", "wheat"]


def test_box_csv_malformed_bbox_names_csv_line_and_text(tmp_path):
    images, csv_path = write_wheat(tmp_path, [
        'b6ab77fd7,48,32,"[3.0, 1.0, 5.0, 9.0]",usask_1',
        'b53afdf5c,48,32,"[0.0, 22.5, 48.0]",arvalis_1',
    ])
    with pytest.raises(DataError, match=r"line 3: bbox '\[0.0, 22.5, 48.0\]'") as error:
        BoxCsvReader(images, csv_path).ids()
    assert error.value.path == str(csv_path)


@pytest.mark.parametrize("row, message", [
    ('b6ab77fd7,48,32,"[30, 1, 20, 9]",usask_1', r"line 2 \(image_id 'b6ab77fd7'\).*outside the 48x32 image"),
    ('b6ab77fd7,48,32,"[3, 1, 0, 9]",usask_1', r"line 2 .*non-positive width"),
    ('b6ab77fd7,1024,1024,"[3, 1, 5, 9]",usask_1', r"line 2 .*1024x1024 but it is 48x32"),
])
def test_box_csv_bad_boxes_name_the_csv_line(tmp_path, row, message):
    images, csv_path = write_wheat(tmp_path, [row])
    with pytest.raises(DataError, match=message) as error:
        BoxCsvReader(images, csv_path).load("b6ab77fd7")
    assert str(csv_path) in str(error.value)


def test_box_csv_missing_image_names_it(tmp_path):
    images, csv_path = write_wheat(tmp_path, ['0000ghost,48,32,"[3, 1, 5, 9]",usask_1'])
    with pytest.raises(DataError, match=r"'0000ghost' at line 2") as error:
        BoxCsvReader(images, csv_path).ids()
    assert error.value.path == str(csv_path)
    with pytest.raises(DataError, match="image file does not exist.*line 2") as error:
        BoxCsvReader(images, csv_path).load("0000ghost")
    assert error.value.path == str(images / "0000ghost.jpg")
    with pytest.raises(DataError, match="CSV file does not exist"):
        BoxCsvReader(images, tmp_path / "nope.csv").ids()


# --- registry ---------------------------------------------------------------------------------------


def test_box_layouts_open_through_the_registry(tmp_path):
    assert {"voc", "coco", "box_csv"} <= set(READERS) and {"voc", "coco", "box_csv"} <= set(MASKS_ROLE)
    voc_images, annotations, _ = write_voc(tmp_path / "voc")
    coco_images, json_path, _ = write_coco(tmp_path / "coco")
    wheat_images, csv_path = write_wheat(tmp_path / "wheat")
    readers = {
        "voc": open_dataset("voc", voc_images, annotations, class_names=["dog", "person"]),
        "coco": open_dataset("coco", coco_images, json_path),
        "box_csv": open_dataset("box_csv", wheat_images, csv_path, image_suffix=".jpg"),
    }
    assert isinstance(readers["voc"], VocBoxReader) and isinstance(readers["coco"], CocoBoxReader)
    assert isinstance(readers["box_csv"], BoxCsvReader)
    for reader in readers.values():
        reader = pickle.loads(pickle.dumps(reader))
        sample = reader.load(reader.ids()[0])
        check_box_arrays(sample)
        assert reader.kind == "boxes" and reader.class_names[0] == "background"
    with pytest.raises(Exception, match="needs dataset.masks"):
        open_dataset("coco", coco_images)


# --- real data --------------------------------------------------------------------------------------


def test_dsb2018_instance_boxes_enclose_each_mask(shared_data):
    root = shared_data / "dsb2018_stage1_train_sample" / "stage1_train"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    reader = DsbReader(root)
    sample_id = reader.ids()[0]
    sample = instance_boxes(reader.load(sample_id))
    check_box_arrays(sample)
    mask_paths = reader.mask_paths(sample_id)
    assert len(sample.boxes) == len(mask_paths) > 0
    for box, path in zip(sample.boxes, mask_paths):  # instance k is the k-th mask file
        rows, cols = np.nonzero(read_mask(path))
        assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], path.name
