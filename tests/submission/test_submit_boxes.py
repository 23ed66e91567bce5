"""The detection submission format (Global Wheat Detection): ``score x y w h`` cells written from
corner boxes, parsed back strictly, validated like the RLE formats, and read back for voc_map."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kseg.app import cli
from kseg.codecs.prediction_string import (
    PredictionStringError,
    box_prediction_string,
    parse_prediction_string,
)
from kseg.core.errors import ConfigError, DataError
from kseg.metrics.detection import voc_map
from kseg.submission.formats import FORMATS, ROW_KINDS, get_format
from kseg.submission.reading import read_box_targets, read_targets
from kseg.submission.validation import SubmissionError, validate_submission
from kseg.submission.writing import box_rows, prediction_rows, write_submission

FMT = get_format("wheat_boxes")
SIZES = {"a": (20, 30), "b": (10, 10), "c": (16, 16)}  # (height, width)
HEADER = "image_id,PredictionString\n"


def write(path, text):
    path.write_text(text)
    return path


def test_the_format_is_registered():
    assert FMT is FORMATS["wheat_boxes"]
    assert (FMT.columns, FMT.rows, FMT.metric, FMT.id_style) == (
        ("image_id", "PredictionString"), "image_boxes", "voc_map", "stem")
    assert FMT.competition == "Global Wheat Detection" and FMT.boxes and "image_boxes" in ROW_KINDS
    assert [name for name, f in FORMATS.items() if f.boxes] == ["wheat_boxes"]
    with pytest.raises(ConfigError, match="wheat_boxes"):
        get_format("wheat")


# -- writing and parsing one cell -------------------------------------------------------------------
def test_prediction_string_sorts_rounds_and_converts_to_xywh():
    boxes = [[10.04, 20.5, 30.26, 40.0],  # w = 30.3 - 10.0 (between rounded corners)
             [0.0, 0.0, 5.0, 5.0],
             [-0.02, 1.0, 3.0, 2.0],      # x rounds to -0.0: written as 0.0
             [1.0, 1.0, 1.02, 9.0]]       # width 0.0 after rounding: left out
    scores = [0.5, 0.91234567, 0.5, 0.7]
    assert box_prediction_string(boxes, scores) == \
        "0.9123 0.0 0.0 5.0 5.0 0.5000 10.0 20.5 20.3 19.5 0.5000 0.0 1.0 3.0 1.0"  # tie keeps input order
    assert box_prediction_string(boxes, scores, decimals=0) == "0.9123 0 0 5 5 0.5000 10 20 20 20 0.5000 0 1 3 1"
    assert box_prediction_string(np.zeros((0, 4)), []) == ""
    assert box_rows("img7", [[1, 2, 4, 6]], [1.0]) == [("img7", "1.0000 1.0 2.0 3.0 4.0")]


@pytest.mark.parametrize("boxes, scores, reason", [
    ([[0, 0, 1, 1]], [1.5], "scores must lie in [0, 1]"),
    ([[0, 0, 1, np.nan]], [0.5], "finite"),
    ([[0, 0, 1]], [0.5], "shape (K, 4)"),
    ([[0, 0, 1, 1]], [0.5, 0.4], "1 boxes but 2 scores"),
])
def test_prediction_string_refuses_bad_input(boxes, scores, reason):
    with pytest.raises(DataError) as info:
        box_prediction_string(boxes, scores)
    assert reason in str(info.value)


def test_parse_gives_corner_boxes_and_scores():
    boxes, scores = parse_prediction_string("0.5 10 20.5 20.25 19.5 0.9 0 0 5 5")
    np.testing.assert_allclose(boxes, [[10, 20.5, 30.25, 40], [0, 0, 5, 5]])
    np.testing.assert_allclose(scores, [0.5, 0.9])  # increasing order is accepted (the scorer sorts)
    assert boxes.dtype == np.float64 and scores.dtype == np.float64
    empty_boxes, empty_scores = parse_prediction_string("  ")
    assert empty_boxes.shape == (0, 4) and empty_scores.shape == (0,)


@pytest.mark.parametrize("text, reason", [
    ("0.9 1 1 3", "4 tokens, not a multiple of 5"),
    ("0.9 1 1 3 3 0.8 1 1 3", "the last group, 2, has 4"),
    ("0.9 1 1 3 3 1.5 1 1 2 2", "group 2: score 1.5 is outside [0, 1]"),
    ("-0.1 1 1 3 3", "group 1: score -0.1 is outside [0, 1]"),
    ("0.5 1 1 -2 2", "group 1: width -2 is not positive"),
    ("0.5 1 1 2 0", "group 1: height 0 is not positive"),
    ("0.5 nan 1 2 2", "group 1: x is 'nan', not a finite number"),
    ("0.5 1 1 2 inf", "group 1: h is 'inf', not a finite number"),
    ("0.5 1 1 2 1e999", "group 1: h is '1e999', not a finite number"),
    ("0.5 1 1 2 2 0.4 1_0 1 2 2", "group 2: x is '1_0', not a finite number"),
    ("0.5 1 1 2 0x1", "group 1: h is '0x1'"),
])
def test_parse_is_strict_and_names_the_row_and_group(text, reason):
    with pytest.raises(PredictionStringError) as info:
        parse_prediction_string(text, "line 7 (image_id 'q')")
    assert str(info.value).startswith("line 7 (image_id 'q'): ") and reason in str(info.value)


def test_parse_checks_boxes_against_the_image_with_half_a_pixel_of_slack():
    size = (10, 20)  # height 10, width 20
    parse_prediction_string("0.5 -0.5 -0.5 20.5 10.5", size=size)  # exactly at the slack: fine
    for text in ("0.5 -0.6 0 5 5", "0.5 0 -0.6 5 5", "0.5 15 0 5.6 5", "0.5 0 5 5 5.6"):
        with pytest.raises(PredictionStringError, match="outside the 20 x 10 .W x H. image"):
            parse_prediction_string(text, size=size)
    with pytest.raises(PredictionStringError, match=r"group 2: .* \(and 1 more bad group"):
        parse_prediction_string("0.9 0 0 1 1 0.5 30 0 5 5 0.4 0 0 1 1 0.3 0 30 5 5", size=size)


finite = st.floats(0, 1000, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, finite, st.floats(2, 300), st.floats(2, 300), st.floats(0, 1)), max_size=30),
       st.sampled_from([0, 1, 2]))
def test_round_trip_property(groups, decimals):
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h, _ in groups], np.float64).reshape(-1, 4)
    scores = np.array([s for *_, s in groups], np.float64)
    parsed_boxes, parsed_scores = parse_prediction_string(box_prediction_string(boxes, scores, decimals))
    order = np.argsort(-scores, kind="stable")
    assert parsed_boxes.shape == boxes.shape
    # Each corner is the input corner rounded to `decimals` (w, h are taken between rounded corners).
    np.testing.assert_allclose(parsed_boxes, np.round(boxes[order], decimals), atol=1e-6)
    np.testing.assert_allclose(parsed_boxes, boxes[order], atol=0.5 * 10.0 ** -decimals + 1e-6)
    np.testing.assert_allclose(parsed_scores, scores[order], atol=5e-5 + 1e-12)
    assert np.all(np.diff(parsed_scores) <= 0), "groups are written best score first"


# -- whole files through the validator ----------------------------------------------------------------
def sample(tmp_path, ids=tuple(SIZES), header="image_id,PredictionString"):
    return write(tmp_path / "sample.csv", header + "\n" + "".join(f"{i},1.0 0 0 50 50\n" for i in ids))


def predictions():
    return {"a": (np.array([[1.0, 2.0, 11.0, 12.0], [20.0, 0.0, 30.0, 20.0], [3.3, 4.4, 5.5, 6.6]]),
                  np.array([0.3, 0.9, 0.6])),
            "b": (np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([0.75])),
            "c": (np.zeros((0, 4)), np.zeros(0))}


def test_a_good_file_passes_with_the_right_object_count(tmp_path):
    rows = [row for image_id, (boxes, scores) in predictions().items() for row in box_rows(image_id, boxes, scores)]
    path = write_submission(tmp_path / "sub.csv", rows, FMT)
    assert path.read_text() == (HEADER + "a,0.9000 20.0 0.0 10.0 20.0 0.6000 3.3 4.4 2.2 2.2 0.3000 1.0 2.0 10.0 10.0\n"
                                "b,0.7500 0.0 0.0 10.0 10.0\nc,\n")
    report = validate_submission(path, FMT, SIZES, sample=sample(tmp_path))
    assert (report.rows, report.images, report.objects) == (3, 3, 4)
    report = validate_submission(path, FMT, SIZES)  # ids from the sizes (the test folder)
    assert report.objects == 4


def test_an_image_without_boxes_and_unsorted_scores_are_valid(tmp_path):
    path = write(tmp_path / "s.csv", HEADER + "a,0.1 1 1 2 2 0.9 3 3 2 2\nb,\nc,\n")
    assert validate_submission(path, FMT, SIZES).objects == 2


BROKEN = (HEADER
          + "a,0.9 1 1 3 3\n"        # line 2: fine
          + "a,0.8 1 1 2 2\n"        # line 3: duplicate row
          + "b,0.9 1 1 3\n"          # line 4: 4 tokens
          + "c,1.5 1 1 2 2\n"        # line 5: score 1.5
          + "d,0.5 1 1 -2 2\n"       # line 6: negative width
          + "e,0.5 8 1 5 2\n"        # line 7: outside the 10 x 10 image
          + "f,0.5 nan 1 2 2\n"      # line 8: nan
          + "zz,0.5 1 1 2 2\n")      # line 9: extra id; g is missing


def test_a_broken_file_lists_every_problem_with_its_line(tmp_path):
    sizes = {image_id: (10, 10) for image_id in "abcdefg"}
    with pytest.raises(SubmissionError) as info:
        validate_submission(write(tmp_path / "s.csv", BROKEN), FMT, sizes)
    assert info.value.problems == [
        "line 3 (image_id 'a'): duplicate of line 2 (one row per image)",
        "line 9 (image_id 'zz'): id is not in the test images (extra id)",
        "line 4 (image_id 'b'): PredictionString has 4 tokens, not a multiple of 5 (groups 'score x y w h'); "
        "the last group, 1, has 4",
        "line 5 (image_id 'c'): group 1: score 1.5 is outside [0, 1]",
        "line 6 (image_id 'd'): group 1: width -2 is not positive",
        "line 7 (image_id 'e'): group 1: box x y w h = 8 1 5 2 is outside the 10 x 10 (W x H) image",
        "line 8 (image_id 'f'): group 1: x is 'nan', not a finite number",
        "image_id 'g' (test image 7) has no row in the submission (missing id)",
    ]
    assert str(info.value).splitlines()[0].endswith("8 problem(s):")


def test_sample_submission_ids_and_header(tmp_path):
    path = write(tmp_path / "s.csv", HEADER + "a,\nb,\n")
    with pytest.raises(SubmissionError) as info:
        validate_submission(path, FMT, SIZES, sample=sample(tmp_path))
    assert info.value.problems == [
        "image_id 'c' (sample submission sample.csv line 4) has no row in the submission (missing id)"]
    other = sample(tmp_path, ids=("a", "b"), header="ImageId,PredictionString")
    with pytest.raises(SubmissionError) as info:
        validate_submission(path, FMT, SIZES, sample=other)
    assert info.value.problems[0].startswith("line 1: header 'image_id,PredictionString' differs from the sample")
    with pytest.raises(SubmissionError, match="line 1: header is 'image_id,EncodedPixels'"):
        validate_submission(write(tmp_path / "rle.csv", "image_id,EncodedPixels\na,\n"), FMT, SIZES)


def test_a_box_without_a_test_image_to_check_against(tmp_path):
    path = write(tmp_path / "s.csv", HEADER + "a,0.5 1 1 2 2\nb,\n")
    with pytest.raises(SubmissionError) as info:
        validate_submission(path, FMT, {"b": (10, 10)}, expected_ids=["a", "b"])
    assert info.value.problems == ["line 2 (image_id 'a'): no test image of this id to check the boxes against "
                                   "(pass the test folder)"]


# -- reading back for local scoring ---------------------------------------------------------------------
def test_read_box_targets_and_voc_map(tmp_path):
    rng = np.random.default_rng(3)
    truths = {}
    for image_id in ("p", "q", "r"):
        corner = rng.uniform(0, 400, (5, 2))
        truths[image_id] = np.column_stack([corner, corner + rng.uniform(20, 90, (5, 2))])
    truths["s"] = np.zeros((0, 4))  # an image without wheat
    rows = [row for image_id, boxes in truths.items() for row in box_rows(image_id, boxes, rng.uniform(0.2, 1, len(boxes)))]
    path = write_submission(tmp_path / "sub.csv", rows, FMT)
    read = read_box_targets(path, FMT, sizes={i: (500, 500) for i in truths})
    assert list(read) == ["p", "q", "r", "s"]
    assert read["s"]["boxes"].shape == (0, 4) and read["p"]["labels"].tolist() == [1] * 5
    truth_list = [{"boxes": truths[i], "labels": np.ones(len(truths[i]), np.int64)} for i in read]
    assert voc_map(list(read.values()), truth_list) == 1.0
    assert voc_map(list(read.values()), [read[i] for i in read]) == 1.0  # the file against itself

    # 3 of 4 truths found, plus one miss ranked last: precision 1 up to recall 3/4 -> AP 0.75.
    truth = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]], np.float64)
    partial = write_submission(tmp_path / "partial.csv", box_rows(
        "t", np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [80, 0, 90, 10]]), [0.9, 0.8, 0.7, 0.1]),
        FMT)
    detections = read_box_targets(partial, FMT)
    assert voc_map([detections["t"]], [{"boxes": truth, "labels": np.ones(4, np.int64)}]) == pytest.approx(0.75)


def test_read_box_targets_is_strict_and_read_targets_points_to_it(tmp_path):
    path = write(tmp_path / "s.csv", BROKEN)
    with pytest.raises(SubmissionError) as info:
        read_box_targets(path, FMT, sizes={"e": (10, 10)})
    assert [p.split(":")[0] for p in info.value.problems] == [
        "line 3 (image_id 'a')", "line 4 (image_id 'b')", "line 5 (image_id 'c')", "line 6 (image_id 'd')",
        "line 7 (image_id 'e')", "line 8 (image_id 'f')"]
    with pytest.raises(ConfigError, match="read_box_targets"):
        read_targets(path, FMT, SIZES)
    with pytest.raises(ConfigError, match="read_targets"):
        read_box_targets(path, get_format("dsb_instances"))
    with pytest.raises(ConfigError, match="box_rows"):
        prediction_rows("a", np.zeros((4, 4), np.int32), FMT)


# -- the command line ------------------------------------------------------------------------------------
def test_cli_validate_a_box_file(tmp_path, capsys):
    import cv2

    folder = tmp_path / "test"
    folder.mkdir()
    for image_id, shape in SIZES.items():  # a flat folder of jpgs: ids are the file stems
        cv2.imwrite(str(folder / f"{image_id}.jpg"), np.zeros((*shape, 3), np.uint8))
    good = write(tmp_path / "good.csv", HEADER + "a,0.9 20 0 10 20 0.5 0 0 2 2\nb,0.7 0 0 10 10\nc,\n")
    assert cli.main(["validate", str(good), "--format", "wheat_boxes", "--test-dir", str(folder)]) == 0
    assert "valid wheat_boxes submission (3 rows, 3 images, 3 objects)" in capsys.readouterr().out
    assert cli.main(["validate", str(good), "--set", "submission.format=wheat_boxes", "--test-dir", str(folder)]) == 0
    bad = write(tmp_path / "bad.csv", HEADER + "a,0.9 21 0 10 20\nb,0.7 0 0 10 10\nc,\n")  # 21 + 10 > 30.5
    assert cli.main(["validate", str(bad), "--format", "wheat_boxes", "--test-dir", str(folder)]) == 2
    assert "line 2 (image_id 'a'): group 1: box x y w h = 21 0 10 20 is outside the 30 x 20" in capsys.readouterr().err
