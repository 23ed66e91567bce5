"""The submission validator rejects each kind of broken file with a message naming the CSV line
(header = line 1) and the id."""

from __future__ import annotations

import numpy as np
import pytest

from kseg.app import cli
from kseg.submission.formats import get_format
from kseg.submission.validation import SubmissionError, validate_submission

SIZES = {"a": (6, 5), "b": (4, 4), "c": (5, 5)}


def write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def sample(tmp_path):
    return write(tmp_path / "sample.csv", "ImageId,EncodedPixels\na,1 1\nb,1 1\nc,1 1\n")


GOOD_DSB = "ImageId,EncodedPixels\na,1 3\na,8 2\nb,\nc,2 2 7 1\n"


def problems(path, fmt_name="dsb_instances", sample=None, **kwargs):
    with pytest.raises(SubmissionError) as info:
        validate_submission(path, get_format(fmt_name), SIZES, sample=sample, **kwargs)
    return str(info.value), info.value.problems


def test_a_good_file_passes(tmp_path, sample):
    report = validate_submission(write(tmp_path / "s.csv", GOOD_DSB), get_format("dsb_instances"), SIZES, sample=sample)
    assert (report.rows, report.images, report.objects) == (4, 3, 3)


def test_missing_id(tmp_path, sample):
    text, found = problems(write(tmp_path / "s.csv", "ImageId,EncodedPixels\na,1 3\nc,2 2\n"), sample=sample)
    assert found == ["ImageId 'b' (sample submission sample.csv line 3) has no row in the submission (missing id)"]


def test_extra_id(tmp_path, sample):
    _, found = problems(write(tmp_path / "s.csv", GOOD_DSB + "zz,1 1\n"), sample=sample)
    assert len(found) == 1 and found[0].startswith("line 6 (ImageId 'zz'): id is not in sample submission")


def test_duplicate_image_where_the_format_has_one_row_per_image(tmp_path):
    path = write(tmp_path / "s.csv", "id,rle_mask\na,1 3\nb,\nc,\na,5 1\n")
    _, found = problems(path, "tgs_salt")
    assert found == ["line 5 (id 'a'): duplicate of line 2 (one row per image)"]


def test_duplicate_image_and_class(tmp_path):
    path = write(tmp_path / "s.csv", "ImageId,ClassId,EncodedPixels\na,1,1 2\na,2,\nb,1,\nc,1,\na,2,4 1\n")
    _, found = problems(path, "severstal")
    assert found == ["line 6 (ImageId 'a'): duplicate of line 3 (one row per image and ClassId 2)"]


@pytest.mark.parametrize("cell, reason", [
    ("5 1 2 2", "does not increase"),        # starts must increase
    ("1 3 2 2", "overlaps the previous run"),
    ("29 3", "past the last pixel 30"),       # a is 6 x 5 = 30 pixels
    ("1 3 x", "not an integer"),
    ("1 0", "length 0 is not positive"),
    ("1", "even count"),
])
def test_bad_rle(tmp_path, sample, cell, reason):
    path = write(tmp_path / "s.csv", f"ImageId,EncodedPixels\nb,\nc,2 2\na,{cell}\n")
    text, found = problems(path, sample=sample)
    assert len(found) == 1 and found[0].startswith("line 4 (ImageId 'a'): ") and reason in found[0]


def test_overlapping_instances(tmp_path, sample):
    path = write(tmp_path / "s.csv", "ImageId,EncodedPixels\na,1 3\nb,\nc,1 1\na,3 2\n")
    _, found = problems(path, sample=sample)
    assert len(found) == 1 and found[0].startswith("line 5 (ImageId 'a'): instance 2 overlaps instance 1 (line 2")


def test_wrong_header(tmp_path, sample):
    text, found = problems(write(tmp_path / "s.csv", "ImageID,EncodedPixels\na,1 1\nb,\nc,\n"), sample=sample)
    assert found[0].startswith("line 1: header is 'ImageID,EncodedPixels'") and "ImageId,EncodedPixels" in found[0]


def test_empty_instance_row_beside_other_rows(tmp_path, sample):
    path = write(tmp_path / "s.csv", "ImageId,EncodedPixels\na,1 3\na,\nb,\nc,\n")
    _, found = problems(path, sample=sample)
    assert len(found) == 1
    assert found[0].startswith("line 3 (ImageId 'a'): empty EncodedPixels row, but the image has 1 other")


def test_empty_cell_where_the_format_writes_minus_one(tmp_path):
    path = write(tmp_path / "s.csv", "ImageId,EncodedPixels\na,0 3\nb,\nc,-1\n")
    _, found = problems(path, "siim_acr")
    assert len(found) == 1
    assert found[0].startswith("line 3 (ImageId 'b'): empty EncodedPixels; format siim_acr writes '-1'")


def test_every_problem_is_listed_not_just_the_first(tmp_path, sample):
    path = write(tmp_path / "s.csv", "ImageId,EncodedPixels\na,1 3\na,2 2\nzz,1 1\nb,99 1\n")
    _, found = problems(path, sample=sample)
    assert [p.split(":")[0] for p in found] == [
        "line 4 (ImageId 'zz')", "line 3 (ImageId 'a')", "line 5 (ImageId 'b')",
        "ImageId 'c' (sample submission sample.csv line 4) has no row in the submission (missing id)"]


def test_sample_header_must_match_the_format(tmp_path, sample):
    path = write(tmp_path / "s.csv", "id,rle_mask\na,\nb,\nc,\n")
    _, found = problems(path, "tgs_salt", sample=sample)
    assert found[0].startswith("line 1: header 'id,rle_mask' differs from the sample submission's")


def test_cli_validate_exits_2_and_names_the_row(tmp_path, sample, capsys):
    import cv2

    for image_id, shape in SIZES.items():  # a DSB-layout test folder: the sizes come from here
        folder = tmp_path / "test" / image_id / "images"
        folder.mkdir(parents=True)
        cv2.imwrite(str(folder / f"{image_id}.png"), np.zeros(shape, np.uint8))
    good = write(tmp_path / "good.csv", GOOD_DSB)
    assert cli.main(["validate", str(good), "--test-dir", str(tmp_path / "test"), "--sample", str(sample)]) == 0
    bad = write(tmp_path / "bad.csv", GOOD_DSB.replace("c,2 2 7 1", "c,2 2 24 3"))
    assert cli.main(["validate", str(bad), "--test-dir", str(tmp_path / "test"), "--sample", str(sample)]) == 2
    assert "line 5 (ImageId 'c')" in capsys.readouterr().err
