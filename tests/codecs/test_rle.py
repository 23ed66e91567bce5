"""kseg.codecs.rle: round trips against a slow reference encoder, literal cases, strict decode errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kseg import rle
from kseg.core.errors import DataError, RLEError


def reference_encode(mask: np.ndarray, order: str) -> str:
    """Slow, obviously correct encoder: walk the pixels one by one in scan order."""
    height, width = mask.shape
    if order == "F":
        pixels = [mask[r][c] for c in range(width) for r in range(height)]
    else:
        pixels = [mask[r][c] for r in range(height) for c in range(width)]
    tokens, run_start = [], None
    for position, value in enumerate(list(pixels) + [0], start=1):
        if value and run_start is None:
            run_start = position
        elif not value and run_start is not None:
            tokens += [run_start, position - run_start]
            run_start = None
    return " ".join(str(t) for t in tokens)


shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))
masks = shapes.flatmap(lambda shape: hnp.arrays(np.bool_, shape))
orders = st.sampled_from(rle.ORDERS)


@settings(max_examples=300, deadline=None)
@given(mask=masks, order=orders)
def test_encode_matches_reference_and_round_trips(mask, order):
    text = rle.encode(mask, order)
    assert text == reference_encode(mask, order)
    decoded = rle.decode(text, mask.shape, order)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, mask.astype(np.uint8))


@pytest.mark.parametrize("order", rle.ORDERS)
@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (1, 1), (5, 4)])
def test_empty_full_and_thin_shapes(shape, order):
    empty = np.zeros(shape, np.uint8)
    full = np.ones(shape, np.uint8)
    assert rle.encode(empty, order) == ""
    n = shape[0] * shape[1]
    assert rle.encode(full, order) == f"1 {n}"
    np.testing.assert_array_equal(rle.decode(f"1 {n}", shape, order), full)
    np.testing.assert_array_equal(rle.decode("", shape, order), empty)


def test_literal_3x3_in_both_orders():
    mask = np.array([[0, 1, 1], [0, 1, 0], [1, 1, 0]])
    # F: columns top to bottom -> 0 0 1 | 1 1 1 | 1 0 0: pixels 3..7 -> "3 5".
    assert rle.encode(mask, "F") == "3 5"
    # C: rows left to right -> 0 1 1 | 0 1 0 | 1 1 0: runs at 2 (2), 5 (1), 7 (2).
    assert rle.encode(mask, "C") == "2 2 5 1 7 2"
    np.testing.assert_array_equal(rle.decode("3 5", (3, 3), "F"), mask)
    np.testing.assert_array_equal(rle.decode("2 2 5 1 7 2", (3, 3), "C"), mask)


def test_nonzero_values_are_foreground():
    mask = np.array([[0, 255], [7, 0]], np.int32)
    assert rle.encode(mask, "F") == "2 2"


@pytest.mark.parametrize("missing", ["", "   ", None, float("nan"), np.nan])
def test_missing_decodes_to_zeros(missing):
    out = rle.decode(missing, (2, 3))
    assert out.shape == (2, 3) and out.dtype == np.uint8 and not out.any()


def test_whitespace_variants_and_touching_runs_decode():
    # Touching runs (second starts where the first ends) are not overlapping.
    out = rle.decode(" 1 2\t3 2\n", (2, 3), "C")
    np.testing.assert_array_equal(out, [[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 2 3", "3 tokens"),
        ("1 a", "token 2 of 2 is 'a'"),
        ("1 2.5", "'2.5', not an integer"),
        ("1 2 ٣ 1", "token 3 of 4"),
        ("0 2", "run 1 (tokens 1-2): start 0 is not positive"),
        ("-1 2", "start -1 is not positive"),
        ("1 0", "length 0 is not positive"),
        ("1 1 4 -2", "run 2 (tokens 3-4): length -2 is not positive"),
        ("5 1 3 1", "run 2 (tokens 3-4): start 3 does not increase"),
        ("5 1 5 1", "start 5 does not increase"),
        ("1 3 2 1", "run 2 (tokens 3-4): start 2 overlaps the previous run"),
        ("8 3", "ends at pixel 10, past the last pixel 9"),
        ("10 1", "past the last pixel 9"),
        ("1 99999999999999999999999", "past the last pixel 9"),
    ],
)
def test_strict_decode_errors_name_row_and_problem(text, expected):
    with pytest.raises(RLEError) as caught:
        rle.decode(text, (3, 3), row="img_0042.png")
    message = str(caught.value)
    assert message.startswith("img_0042.png: ")
    assert expected in message
    assert caught.value.path == "img_0042.png"


def test_first_bad_run_is_reported():
    # Run 2 has a zero length and run 3 runs past the end: the earlier problem wins.
    with pytest.raises(RLEError, match="run 2 .*length 0"):
        rle.decode("1 1 3 0 8 5", (3, 3), row="row 17")


def test_non_string_rle_is_rejected():
    with pytest.raises(RLEError, match="row 3: RLE must be a string"):
        rle.decode(12, (3, 3), row="row 3")


def test_orders_are_validated_in_one_place():
    assert rle.check_order("F") == "F"
    for call in (
        lambda: rle.encode(np.zeros((2, 2)), "f"),
        lambda: rle.decode("", (2, 2), "row"),
        lambda: rle.labels_to_rles(np.zeros((2, 2), int), "A"),
        lambda: rle.rles_to_labels([], (2, 2), "K"),
    ):
        with pytest.raises(ValueError, match="unknown RLE pixel order"):
            call()


def test_shapes_must_be_two_dimensional():
    with pytest.raises(ValueError):
        rle.encode(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError):
        rle.decode("1 1", (4,))


# --- instances ----------------------------------------------------------------------------------

label_images = shapes.flatmap(
    lambda shape: hnp.arrays(np.int32, shape, elements=st.sampled_from([0, 0, 2, 3, 17, 40]))
)


@settings(max_examples=200, deadline=None)
@given(labels=label_images, order=orders)
def test_labels_to_rles_matches_per_instance_encode_and_round_trips(labels, order):
    ids = [i for i in np.unique(labels) if i != 0]
    rles = rle.labels_to_rles(labels, order)
    assert rles == [reference_encode(labels == i, order) for i in ids]
    # Instance k (1-based, in id order) comes back as label k.
    expected = np.zeros(labels.shape, np.int32)
    for k, i in enumerate(ids, start=1):
        expected[labels == i] = k
    back = rle.rles_to_labels(rles, labels.shape, order)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, expected)


def test_instance_spanning_full_columns_merges_across_columns():
    # Object 5 fills the bottom of column 0 and the top of column 1: in F order this is one run.
    labels = np.array([[0, 5, 0], [5, 5, 0], [5, 0, 0]])
    assert rle.labels_to_rles(labels, "F") == ["2 4"]
    assert rle.labels_to_rles(labels, "C") == ["2 1 4 2 7 1"]


def test_labels_to_rles_rejects_bad_label_images():
    assert rle.labels_to_rles(np.zeros((3, 3), np.int32)) == []
    with pytest.raises(DataError, match="negative"):
        rle.labels_to_rles(np.array([[0, -1]]))
    with pytest.raises(ValueError, match="integer dtype"):
        rle.labels_to_rles(np.zeros((2, 2), np.float32))


def test_rles_to_labels_empty_entries_keep_numbering():
    out = rle.rles_to_labels(["1 1", "", float("nan"), "4 2"], (2, 3), "C")
    np.testing.assert_array_equal(out, [[1, 0, 0], [4, 4, 0]])
    assert not rle.rles_to_labels([], (2, 2)).any()


def test_overlapping_instances_raise_naming_both():
    rles = ["1 2", "4 1", "2 2"]  # instance 3 shares pixel 2 with instance 1
    with pytest.raises(RLEError) as caught:
        rle.rles_to_labels(rles, (3, 3), row="ship_7.jpg")
    message = str(caught.value)
    assert message.startswith("ship_7.jpg: ")
    assert "instances 1 and 3 overlap at pixel 2" in message


def test_bad_instance_string_names_row_and_instance():
    with pytest.raises(RLEError, match=r"row 9: instance 2 RLE run 1 .*past the last pixel 4"):
        rle.rles_to_labels(["1 1", "3 5"], (2, 2), row="row 9")


def test_per_instance_row_labels_name_the_offending_lines():
    lines = ["train.csv line 2", "train.csv line 3", "train.csv line 4"]
    with pytest.raises(RLEError) as caught:
        rle.rles_to_labels(["1 2", "4 1", "2 2"], (3, 3), row=lines)
    message = str(caught.value)
    assert message.startswith("train.csv line 4: instance 3 overlaps instance 1 (train.csv line 2)")
    with pytest.raises(RLEError, match="^train.csv line 3: instance 2 RLE token 1"):
        rle.rles_to_labels(["1 2", "x 1", "7 1"], (3, 3), row=lines)
    with pytest.raises(ValueError, match="2 labels for 3"):
        rle.rles_to_labels(["1 1", "2 1", "3 1"], (3, 3), row=lines[:2])
