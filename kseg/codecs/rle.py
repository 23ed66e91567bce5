"""Kaggle run-length encoding: both pixel orders, strict decoding, per-instance strings.

A run-length string is ``"start length start length ..."`` with 1-based starts over the image
flattened in one of two pixel orders (``ORDERS``):

* ``"F"``: top to bottom, then left to right (DSB 2018, TGS Salt, Airbus, Severstal);
* ``"C"``: left to right, then top to bottom (Carvana).

``decode`` is strict: a string that a competition's scorer would reject (or silently misread)
raises ``RLEError`` naming the row/id and the offending token or run, so a broken submission is
caught before upload. Everything is vectorised: encoding finds runs with one comparison of shifted
arrays, decoding fills the image with one ``np.repeat`` over alternating gap/run counts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from kseg.core.errors import DataError, RLEError

ORDERS = ("F", "C")
"""Pixel orders: "F" = column-major (top-to-bottom first), "C" = row-major."""

_ALLOWED_BYTES = np.zeros(256, dtype=bool)
_ALLOWED_BYTES[np.frombuffer(b"0123456789 \t\n\r\x0b\x0c", dtype=np.uint8)] = True
_SIGNED_INTEGER = re.compile(r"[+-]?[0-9]+")
_CLAMP = 2**62  # any token above this is reported as too large; keeps start + length in int64


def check_order(order: str) -> str:
    """Return ``order`` if it is one of ``ORDERS``; the one place that validates order names."""
    if order not in ORDERS:
        raise ValueError(f"unknown RLE pixel order {order!r}; expected one of {ORDERS}")
    return order


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(height, width) as ints; RLE is defined on 2-D images only."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 0:
        raise ValueError(f"RLE image shape must be (height, width) >= 0, got {shape}")
    return shape


def _check_2d(array: np.ndarray, what: str) -> np.ndarray:
    """The input as an array, if it is an H x W image (RLE has no meaning for other ranks)."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D H x W array, got shape {array.shape}")
    return array


def _foreground(mask: np.ndarray) -> np.ndarray:
    """Boolean view/copy of a mask: nonzero is foreground (bool != 0 is slow, so skip it)."""
    return mask if mask.dtype == np.bool_ else mask != 0


# --- encoding ---------------------------------------------------------------------------------


def _run_bounds(fg: np.ndarray, order: str) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of every run start and end (exclusive) of a 2-D bool array, in scan order.

    Runs are cut at the array's edge along the scan axis (so a crop's runs never wrap into the
    next column/row); entries alternate start, end, start, end. Works on the array as stored:
    transitions are found along the scan axis in place instead of paying for a
    transposed copy, and only the (few) transitions are reordered for "F".
    """
    height, width = fg.shape
    if order == "C":
        padded = np.zeros((height, width + 2), dtype=bool)
        padded[:, 1:-1] = fg
        flat = np.flatnonzero(padded[:, 1:] != padded[:, :-1])
        rows, cols = np.divmod(flat, width + 1)
    else:
        padded = np.zeros((height + 2, width), dtype=bool)
        padded[1:-1] = fg
        flat = np.flatnonzero(padded[1:] != padded[:-1])
        rows, cols = np.divmod(flat, width)
        # Found in row-major order; each column holds an even number of transitions, so sorting
        # by (column, row) restores the start/end alternation in column-major scan order.
        scan = np.argsort(cols * (height + 1) + rows, kind="stable")
        rows, cols = rows[scan], cols[scan]
    return rows, cols


def _runs_in_image(
    fg: np.ndarray, order: str, image_shape: tuple[int, int], offset: tuple[int, int] = (0, 0)
) -> tuple[np.ndarray, np.ndarray]:
    """0-based starts and lengths of ``fg`` (a crop at ``offset``) in full-image pixel indices.

    Runs that touch across a crop/image edge (end of one column, top of the next, when the crop
    spans the full height) are merged so the result equals encoding the full-size mask.
    """
    rows, cols = _run_bounds(fg, order)
    rows = rows + offset[0]
    cols = cols + offset[1]
    height, width = image_shape
    index = cols * height + rows if order == "F" else rows * width + cols
    starts, ends = index[0::2], index[1::2]
    if starts.size > 1:
        separate = starts[1:] != ends[:-1]
        starts = starts[np.concatenate(([True], separate))]
        ends = ends[np.concatenate((separate, [True]))]
    return starts, ends - starts


def _format_runs(starts0: np.ndarray, lengths: np.ndarray) -> str:
    """'start length ...' with 1-based starts."""
    pairs = np.empty(2 * starts0.size, dtype=np.int64)
    pairs[0::2] = starts0 + 1
    pairs[1::2] = lengths
    return " ".join(map(str, pairs.tolist()))


def encode(mask: np.ndarray, order: str = "F") -> str:
    """Run-length string of a 2-D mask (nonzero = foreground); an empty mask gives ""."""
    check_order(order)
    fg = _foreground(_check_2d(mask, "mask"))
    return _format_runs(*_runs_in_image(fg, order, fg.shape))


def labels_to_rles(labels: np.ndarray, order: str = "F") -> list[str]:
    """One run-length string per instance of a label image (0 = background), by label id.

    Each instance is encoded from its ``find_objects`` bounding-box crop, so the cost follows the
    instances' area instead of instances x full image; runs are in full-image pixel indices.
    Absent ids (labels need not be consecutive) produce no string.
    """
    check_order(order)
    labels = _check_2d(labels, "label image")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"label image must have an integer dtype, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise DataError(f"label image has negative label {labels.min()}; expected 0 = background")
    rles = []
    for index, box in enumerate(ndimage.find_objects(labels)):
        if box is None:
            continue
        crop = labels[box] == index + 1
        offset = (box[0].start, box[1].start)
        rles.append(_format_runs(*_runs_in_image(crop, order, labels.shape, offset)))
    return rles


# --- decoding ---------------------------------------------------------------------------------


def _is_missing(rle: object) -> bool:
    """None, NaN (pandas' empty CSV cell) or a blank string: an empty mask."""
    if rle is None:
        return True
    if isinstance(rle, float):
        return math.isnan(rle)
    return isinstance(rle, str) and not rle.strip()


def _parse_integers(text: str, what: str, row: object) -> np.ndarray:
    """Tokens of ``text`` as int64, or RLEError naming the first non-integer token.

    Fast path: when every byte is an ASCII digit or whitespace, ``np.fromstring`` parses the whole
    string in C. Anything else (signs, letters, decimals, non-ASCII) takes the token-by-token path,
    which either finds the offending token or returns signed values for the range checks.
    """
    try:
        raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError:
        raw = None
    if raw is not None and _ALLOWED_BYTES[raw].all():
        values = np.fromstring(text, dtype=np.int64, sep=" ")
        # Digits-only tokens of 19+ digits saturate at the int64 maximum.
        return np.minimum(values, _CLAMP)
    tokens = text.split()
    for position, token in enumerate(tokens, start=1):
        if not _SIGNED_INTEGER.fullmatch(token):
            raise RLEError(
                f"{what} token {position} of {len(tokens)} is {token!r}, not an integer", row
            )
    return np.array([max(-_CLAMP, min(int(t), _CLAMP)) for t in tokens], dtype=np.int64)


def _show(value: np.integer) -> str:
    """A token value for a message; clamped (absurdly large) values are shown as such."""
    value = int(value)
    if abs(value) < _CLAMP:
        return str(value)
    return "<=-2**62" if value < 0 else ">=2**62"


def _first_bad_run(starts: np.ndarray, lengths: np.ndarray, n_pixels: int) -> tuple[int, str]:
    """(index, reason) of the earliest run that is wrong, or (-1, "") if all are valid.

    Checks run in the order a reader would: the run's own values, then its order relative to the
    previous run, then the image end. All are vectorised over runs.
    """
    ends = starts + lengths  # 1-based exclusive end; inputs are clamped, so no overflow
    previous_starts = np.concatenate(([0], starts[:-1]))
    previous_ends = np.concatenate(([1], ends[:-1]))
    checks = (
        (starts < 1, "start {s} is not positive (starts are 1-based)"),
        (lengths < 1, "length {l} is not positive"),
        (
            starts <= previous_starts,
            "start {s} does not increase past the previous run's start {ps}",
        ),
        (
            starts < previous_ends,
            "start {s} overlaps the previous run "
            "(start {ps}, length {pl}, covering up to pixel {pe})",
        ),
        (ends - 1 > n_pixels, "start {s} length {l} ends at pixel {e}, past the last pixel {n}"),
    )
    first_index, first_reason = -1, ""
    for bad, reason in checks:
        if bad.any():
            index = int(np.argmax(bad))
            if first_index < 0 or index < first_index:
                first_index, first_reason = index, reason
    if first_index < 0:
        return -1, ""
    i = first_index
    values = {
        "s": _show(starts[i]),
        "l": _show(lengths[i]),
        "e": _show(ends[i] - 1),
        "n": n_pixels,
        "ps": _show(previous_starts[i]),
        "pl": _show(lengths[i - 1]) if i else 0,
        "pe": _show(previous_ends[i] - 1),
    }
    return i, first_reason.format(**values)


def _parse_runs(
    rle: object, n_pixels: int, shape: tuple[int, int], what: str, row: object
) -> tuple[np.ndarray, np.ndarray]:
    """Strictly validated 0-based starts and lengths of one run-length string."""
    if _is_missing(rle):
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    if not isinstance(rle, str):
        raise RLEError(f"{what} must be a string, got {type(rle).__name__} {rle!r}", row)
    values = _parse_integers(rle, what, row)
    if values.size % 2:
        raise RLEError(
            f"{what} has {values.size} tokens; expected start/length pairs (an even count)", row
        )
    starts, lengths = values[0::2], values[1::2]
    index, reason = _first_bad_run(starts, lengths, n_pixels)
    if index >= 0:
        raise RLEError(
            f"{what} run {index + 1} (tokens {2 * index + 1}-{2 * index + 2}): {reason} "
            f"(image shape {shape})",
            row,
        )
    return starts - 1, lengths


def _fill(
    starts0: np.ndarray, lengths: np.ndarray, values: np.ndarray, n_pixels: int, dtype
) -> np.ndarray:
    """Flat image of sorted, non-overlapping runs: one np.repeat over gap/run counts.

    Measured faster than both a Python loop of slice assignments (long runs) and scattering
    repeated indices (many short runs), because it writes each output byte once in order.
    """
    counts = np.empty(2 * starts0.size + 1, dtype=np.int64)
    ends = starts0 + lengths
    counts[0:-1:2] = starts0 - np.concatenate(([0], ends[:-1]))
    counts[1::2] = lengths
    counts[-1] = n_pixels - (ends[-1] if ends.size else 0)
    fill = np.zeros(counts.size, dtype=dtype)
    fill[1::2] = values
    return np.repeat(fill, counts)


def _unflatten(flat: np.ndarray, shape: tuple[int, int], order: str) -> np.ndarray:
    """Image view of a flat pixel array; for "F" a Fortran-ordered view (no transposing copy)."""
    return flat.reshape(shape, order=order)


def decode(
    rle: object, shape: Sequence[int], order: str = "F", *, row: object = None
) -> np.ndarray:
    """uint8 0/1 mask of ``shape`` from a run-length string; "", NaN or None give zeros.

    Raises RLEError (prefixed with ``row``, e.g. an ImageId or "row 17") for an odd token count,
    a non-integer token, a non-positive start or length, starts that do not increase, runs that
    overlap, or a run past the image end. For order "F" the result is a Fortran-ordered view;
    use ``np.ascontiguousarray`` where a C library needs row-major memory.
    """
    check_order(order)
    shape = _check_shape(shape)
    n_pixels = shape[0] * shape[1]
    starts0, lengths = _parse_runs(rle, n_pixels, shape, "RLE", row)
    flat = _fill(starts0, lengths, np.uint8(1), n_pixels, np.uint8)
    return _unflatten(flat, shape, order)


def rles_to_labels(
    rles: Sequence[object],
    shape: Sequence[int],
    order: str = "F",
    *,
    row: object | list[object] | tuple[object, ...] = None,
) -> np.ndarray:
    """int32 label image from one run-length string per instance; the i-th string is label i+1.

    Every string is decoded strictly and instances that share a pixel raise RLEError naming both.
    ``row`` labels errors: one label for the whole image (an ImageId), or a list/tuple with one
    label per string (e.g. CSV line numbers, when each instance is its own row).
    """
    check_order(order)
    shape = _check_shape(shape)
    rles = list(rles)
    per_instance = isinstance(row, (list, tuple))
    if per_instance and len(row) != len(rles):
        raise ValueError(f"row has {len(row)} labels for {len(rles)} RLE strings")

    def row_of(label: int) -> object:
        return row[label - 1] if per_instance else row

    n_pixels = shape[0] * shape[1]
    starts_list, lengths_list, label_list = [], [], []
    for label, text in enumerate(rles, start=1):
        what = f"instance {label} RLE"
        starts0, lengths = _parse_runs(text, n_pixels, shape, what, row_of(label))
        starts_list.append(starts0)
        lengths_list.append(lengths)
        label_list.append(np.full(starts0.size, label, dtype=np.int32))
    if not starts_list:
        return np.zeros(shape, dtype=np.int32)
    starts0 = np.concatenate(starts_list)
    lengths = np.concatenate(lengths_list)
    run_labels = np.concatenate(label_list)
    by_start = np.argsort(starts0, kind="stable")
    starts0, lengths, run_labels = starts0[by_start], lengths[by_start], run_labels[by_start]
    # Runs of one instance never overlap (checked above), so after sorting by start any overlap
    # between instances shows up between neighbours.
    overlap = starts0[1:] < starts0[:-1] + lengths[:-1]
    if overlap.any():
        k = int(np.argmax(overlap))
        first, second = sorted((int(run_labels[k]), int(run_labels[k + 1])))
        where = f"at pixel {int(starts0[k + 1]) + 1} (1-based, order {order})"
        if per_instance:
            message = f"instance {second} overlaps instance {first} ({row_of(first)}) {where}"
        else:
            message = f"instances {first} and {second} overlap {where}"
        raise RLEError(f"{message}; instance i is the i-th RLE and gets label i", row_of(second))
    flat = _fill(starts0, lengths, run_labels, n_pixels, np.int32)
    return _unflatten(flat, shape, order)
