"""Kaggle run-length encoding, where notebooks import it: ``kseg.rle.encode`` / ``kseg.rle.decode``.

The implementation lives in :mod:`kseg.codecs.rle`.
"""

from kseg.codecs.rle import (
    ORDERS,
    check_order,
    decode,
    encode,
    labels_to_rles,
    rles_to_labels,
)

__all__ = ["ORDERS", "check_order", "decode", "encode", "labels_to_rles", "rles_to_labels"]
