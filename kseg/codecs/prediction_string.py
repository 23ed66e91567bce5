"""Global Wheat Detection PredictionString cells: ``score x y w h`` groups per image.

Boxes in kseg are float (K, 4) pixel corners ``(x_min, y_min, x_max, y_max)`` with no +1
(``w = x_max - x_min``, as :mod:`kseg.metrics.detection`).
"""

from __future__ import annotations

import re

import numpy as np

from kseg.core.boxes import xywh_to_xyxy
from kseg.core.errors import ConfigError, DataError

# --- box cells (detection formats) ------------------------------------------------------------------
BOX_FIELDS = ("score", "x", "y", "w", "h")


BOX_SLACK = 0.5  # pixels a box may reach past the image border (rounding of pixel coordinates)


_NUMBER = r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"  # no nan, inf, hex or 1_0


_TOKEN = re.compile(_NUMBER)


_TOKENS = re.compile(rf"\s*{_NUMBER}(?:\s+{_NUMBER})*\s*")


class PredictionStringError(DataError):
    """A PredictionString that does not parse strictly (names the row and the box group)."""


def box_prediction_string(boxes_xyxy, scores, decimals: int = 1) -> str:
    """One image's boxes as a Global Wheat Detection cell: ``score x y w h`` groups, best first.

    ``boxes_xyxy``: float (K, 4) pixel corners ``(x_min, y_min, x_max, y_max)``, no +1. Scores are
    written with 4 decimals, x y w h with ``decimals`` (0 writes integers). The corners are rounded
    and ``w``, ``h`` taken between the rounded corners, so a box inside the image stays inside; a
    box with no width or height after rounding is left out (it can only be a false positive).
    Ties in score keep their input order. No box gives "".
    """
    boxes = np.asarray(boxes_xyxy, np.float64)
    boxes = boxes.reshape(0, 4) if boxes.size == 0 else boxes
    scores = np.asarray(scores, np.float64).reshape(-1)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise DataError(f"boxes must have shape (K, 4) in (x_min, y_min, x_max, y_max), got {boxes.shape}")
    if scores.shape[0] != boxes.shape[0]:
        raise DataError(f"{boxes.shape[0]} boxes but {scores.shape[0]} scores")
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise DataError("boxes and scores must be finite numbers")
    if scores.size and (scores.min() < 0 or scores.max() > 1):
        raise DataError(f"scores must lie in [0, 1], got {scores.min():g} .. {scores.max():g}")
    if int(decimals) != decimals or decimals < 0:
        raise ConfigError(f"decimals={decimals!r} must be a whole number >= 0")
    decimals = int(decimals)
    order = np.argsort(-scores, kind="stable")
    corners = np.round(boxes[order], decimals) + 0.0  # + 0.0: no "-0"
    sides = np.round(corners[:, 2:] - corners[:, :2], decimals)
    keep = (sides > 0).all(axis=1)
    table = np.column_stack([scores[order], corners[:, :2], sides])[keep]
    group = " ".join(["%.4f"] + [f"%.{decimals}f"] * 4)
    return " ".join([group] * len(table)) % tuple(table.ravel().tolist())


def parse_prediction_string(text: str, where: str = "", size: tuple[int, int] | None = None
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Strict inverse of :func:`box_prediction_string`: ``(boxes_xyxy float64 (K, 4), scores (K,))``.

    Every token must be a finite decimal number, their count a multiple of 5, each score in
    [0, 1] and each w, h > 0; with ``size`` = (height, width) each box must also lie in the
    image (``BOX_SLACK`` pixels of slack). Score order is not checked (the scorer sorts). Raises
    PredictionStringError naming ``where`` (e.g. the CSV line and id) and the first bad group.
    """
    def fail(message: str):
        raise PredictionStringError(message, where or None)

    tokens = text.split()
    if not tokens:
        return np.zeros((0, 4)), np.zeros(0)
    if len(tokens) % 5:
        fail(f"PredictionString has {len(tokens)} tokens, not a multiple of 5 (groups 'score x y w h'); the last "
             f"group, {len(tokens) // 5 + 1}, has {len(tokens) % 5}")
    if not _TOKENS.fullmatch(text):
        index = next(i for i, t in enumerate(tokens) if not _TOKEN.fullmatch(t))
        fail(f"group {index // 5 + 1}: {BOX_FIELDS[index % 5]} is {tokens[index]!r}, not a finite number")
    table = np.array(tokens, np.float64).reshape(-1, 5)
    if not np.isfinite(table).all():  # 1e999 overflows
        index = int(np.flatnonzero(~np.isfinite(table.ravel()))[0])
        fail(f"group {index // 5 + 1}: {BOX_FIELDS[index % 5]} is {tokens[index]!r}, not a finite number")
    scores, x, y, w, h = table.T
    height, width = size if size is not None else (np.inf, np.inf)
    checks = np.stack([(scores < 0) | (scores > 1), w <= 0, h <= 0,
                       (x < -BOX_SLACK) | (y < -BOX_SLACK) | (x + w > width + BOX_SLACK) | (y + h > height + BOX_SLACK)])
    bad = np.flatnonzero(checks.any(axis=0))
    if bad.size:
        k = int(bad[0])
        score, xt, yt, wt, ht = tokens[5 * k:5 * k + 5]
        reasons = [f"score {score} is outside [0, 1]", f"width {wt} is not positive", f"height {ht} is not positive",
                   f"box x y w h = {xt} {yt} {wt} {ht} is outside the {width} x {height} (W x H) image"]
        message = "; ".join(r for r, failed in zip(reasons, checks[:, k]) if failed)
        more = f" (and {bad.size - 1} more bad group(s))" if bad.size > 1 else ""
        fail(f"group {k + 1}: {message}{more}")
    return xywh_to_xyxy(table[:, 1:]), scores
