"""SIIM-ACR relative run-length encoding: starts counted from the end of the previous run.
"""

from __future__ import annotations

import re

import numpy as np

from kseg.core.errors import RLEError

# --- run-length cells ---------------------------------------------------------------------------
_INTEGER = re.compile(r"-?[0-9]+")


def to_relative(absolute: str) -> str:
    """Absolute Kaggle RLE (1-based starts) -> SIIM-ACR relative RLE (gaps, first start 0-based)."""
    if not absolute:
        return ""
    values = np.array(absolute.split(), np.int64)
    starts0, lengths = values[0::2] - 1, values[1::2]
    gaps = starts0 - np.concatenate(([0], starts0[:-1] + lengths[:-1]))
    out = np.empty_like(values)
    out[0::2], out[1::2] = gaps, lengths
    return " ".join(map(str, out.tolist()))


def to_absolute(relative: str, row: object = None) -> str:
    """SIIM-ACR relative RLE -> absolute Kaggle RLE, so :func:`kseg.rle.decode` checks it strictly."""
    tokens = relative.split()
    for position, token in enumerate(tokens, start=1):
        if not _INTEGER.fullmatch(token):
            raise RLEError(f"relative RLE token {position} of {len(tokens)} is {token!r}, not an integer", row)
    if len(tokens) % 2:
        raise RLEError(f"relative RLE has {len(tokens)} tokens; expected offset/length pairs", row)
    values = np.array([int(t) for t in tokens], np.int64)
    gaps, lengths = values[0::2], values[1::2]
    if gaps.size and gaps.min() < 0:
        k = int(np.argmax(gaps < 0))
        raise RLEError(f"relative RLE run {k + 1}: offset {gaps[k]} is negative", row)
    starts0 = np.cumsum(gaps) + np.concatenate(([0], np.cumsum(lengths)[:-1]))
    out = np.empty_like(values)
    out[0::2], out[1::2] = starts0 + 1, lengths
    return " ".join(map(str, out.tolist()))
