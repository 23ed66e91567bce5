"""The RLE cells of a submission format (the format registry itself is :mod:`kseg.core.formats`,
re-exported here): encode a mask into the format's cell and decode a cell back, strictly.

:mod:`kseg.codecs.prediction_string` writes and parses the cells of box formats. Writing rows,
reading a file back and validating it live beside this module (writing, reading, validation).
"""

from __future__ import annotations

import numpy as np

from kseg.codecs import rle
from kseg.codecs.relative import to_absolute, to_relative
from kseg.core.formats import FORMATS, ROW_KINDS, SubmissionFormat, get_format


def encode_cell(mask: np.ndarray, fmt: SubmissionFormat) -> str:
    """One mask as the format's RLE cell (the format's empty marker when nothing is set)."""
    text = rle.encode(mask, fmt.order)
    if not text:
        return fmt.empty
    return to_relative(text) if fmt.relative else text


def decode_cell(text: str, shape: tuple[int, int], fmt: SubmissionFormat, row: object = None) -> np.ndarray:
    """Strict inverse of :func:`encode_cell`: a uint8 0/1 mask, or RLEError naming ``row``."""
    text = text.strip()
    if text == fmt.empty or (fmt.relative and not text):
        return np.zeros(shape, np.uint8)
    if fmt.relative:
        text = to_absolute(text, row)
    return rle.decode(text, shape, fmt.order, row=row)


__all__ = ["FORMATS", "ROW_KINDS", "SubmissionFormat", "decode_cell", "encode_cell", "get_format"]
