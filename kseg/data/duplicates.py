"""Near-duplicate images: one picture at another size or brightness, or two crops that overlap.

Competition sets often hold several tiles cut from one slide or video frame (the 2018 Data
Science Bowl's stage-1 images include overlapping crops). A fold split that trains on one tile and
validates on its neighbour scores memory, not generalisation, so ``split.near_duplicates: true``
clusters such images and ``kfold_split`` keeps every cluster in one fold.

Two images of the same group (:func:`kseg.io.modality.image_group`) are near duplicates when

- their grey thumbnails (``THUMBNAIL`` px, zero mean, unit norm) correlate at ``SAME_PICTURE`` or
  more: the same picture resized, re-encoded or re-exposed; or
- one of one image's most textured patches (``PATCH`` px of the grey image at ``SCALE``, on a
  grid) is found in the other by normalised cross-correlation at ``PATCH_MATCH`` or more, and the
  whole region where the two images then overlap (at least ``MIN_OVERLAP`` patches' area)
  correlates at ``OVERLAP_MATCH`` or more: a crop overlapping it. The patch alone is not enough (a
  lone nucleus on black matches any other lone nucleus); the overlap check is what decides.

Clusters are the connected components of that graph. The search compares every pair within a
group (OpenCV's ``matchTemplate`` does the pixel work): seconds for a hundred images, minutes for a
full competition set, so the result is kept beside the preprocessing cache.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from kseg.core.fileio import atomic_write_text
from kseg.io.modality import image_group

THUMBNAIL = 32
SAME_PICTURE = 0.95
SCALE = 0.25  # patches are matched on images shrunk by this factor
PATCH = 24  # at SCALE: 96 px of the image
PATCHES = 8  # the most textured grid patches tried per image
PATCH_MATCH = 0.85
OVERLAP_MATCH = 0.9
MIN_OVERLAP = 4  # the overlap covers at least this many patches' area (192 x 192 px of the image): over
# a patch's area alone, the overlap check would only repeat the patch match
CACHE_NAME = "near_duplicates.json"


def _grey(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.float32)
    return image.mean(axis=2) if image.ndim == 3 else image


def _thumbnail(grey: np.ndarray) -> np.ndarray:
    small = cv2.resize(grey, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA).ravel()
    small = small - small.mean()
    norm = np.linalg.norm(small)
    return small / norm if norm > 0 else small


def _patches(image: np.ndarray) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """The ``PATCHES`` grid patches of highest standard deviation (a flat patch cannot be matched)."""
    rows, cols = image.shape[0] // PATCH, image.shape[1] // PATCH
    if rows == 0 or cols == 0:
        return []
    grid = image[:rows * PATCH, :cols * PATCH].reshape(rows, PATCH, cols, PATCH)
    spread = grid.std(axis=(1, 3)).ravel()
    chosen = [int(i) for i in np.argsort(-spread, kind="stable")[:PATCHES] if spread[i] > 0.1]
    return [(np.ascontiguousarray(image[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH]), (r * PATCH, c * PATCH))
            for r, c in (divmod(i, cols) for i in chosen)]


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / norm if norm > 0 else 0.0


def _overlaps(patches, image: np.ndarray, other: np.ndarray) -> bool:
    """Whether one of ``image``'s ``patches`` is found in ``other`` at an offset where the two
    images' whole overlap correlates (see the module notes)."""
    if other.shape[0] < PATCH or other.shape[1] < PATCH:
        return False
    tried = set()
    for patch, (top, left) in patches:
        response = cv2.matchTemplate(other, patch, cv2.TM_CCOEFF_NORMED)
        y, x = np.unravel_index(int(np.argmax(response)), response.shape)
        dy, dx = int(y) - top, int(x) - left  # other[r + dy, c + dx] shows image[r, c]
        if response[y, x] < PATCH_MATCH or (dy, dx) in tried:
            continue
        tried.add((dy, dx))
        r0, r1 = max(0, -dy), min(image.shape[0], other.shape[0] - dy)
        c0, c1 = max(0, -dx), min(image.shape[1], other.shape[1] - dx)
        if (r1 - r0) * (c1 - c0) < MIN_OVERLAP * PATCH * PATCH:
            continue
        if _correlation(image[r0:r1, c0:c1], other[r0 + dy:r1 + dy, c0 + dx:c1 + dx]) >= OVERLAP_MATCH:
            return True
    return False


def near_duplicate_pairs(images: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, of near-duplicate images (uint8, any size)."""
    greys = [_grey(image) for image in images]
    groups = np.array([image_group(np.asarray(image)) for image in images])
    thumbnails = np.stack([_thumbnail(grey) for grey in greys]) if greys else np.zeros((0, THUMBNAIL ** 2))
    same_group = groups[:, None] == groups[None, :]
    similar = (thumbnails @ thumbnails.T >= SAME_PICTURE) & same_group
    pairs = {(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(similar, k=1)))}
    small = [cv2.resize(g, (max(round(g.shape[1] * SCALE), 1), max(round(g.shape[0] * SCALE), 1)),
                        interpolation=cv2.INTER_AREA) for g in greys]
    patches = [_patches(image) for image in small]
    for i in range(len(images)):
        for j in np.flatnonzero(same_group[i]):
            pair = (min(i, int(j)), max(i, int(j)))
            if j != i and pair not in pairs and _overlaps(patches[i], small[i], small[j]):
                pairs.add(pair)
    return sorted(pairs)


def clusters_from_pairs(count: int, pairs: Sequence[tuple[int, int]]) -> list[int]:
    """A cluster label per image: the connected components of the pair graph (labels 0..k-1,
    numbered in order of each cluster's first image)."""
    if count == 0:
        return []
    rows = [i for i, _ in pairs]
    cols = [j for _, j in pairs]
    graph = coo_matrix((np.ones(len(pairs)), (rows, cols)), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    first = {}
    return [first.setdefault(int(label), len(first)) for label in labels]


def near_duplicate_clusters(ids: Sequence[str], load_image, cache_dir: Path | None = None) -> list[int]:
    """A cluster label per id (``load_image(id)`` gives its uint8 image). With ``cache_dir`` (the
    preprocessing cache folder, whose name already hashes the images) the pairs are kept there as
    ``near_duplicates.json`` and read back next time."""
    ids = [str(i) for i in ids]
    path = Path(cache_dir) / CACHE_NAME if cache_dir is not None else None
    rule = {"thumbnail": THUMBNAIL, "same_picture": SAME_PICTURE, "scale": SCALE, "patch": PATCH,
            "patches": PATCHES, "patch_match": PATCH_MATCH, "overlap_match": OVERLAP_MATCH,
            "min_overlap": MIN_OVERLAP}
    if path is not None and path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("rule") == rule and kept.get("ids") == ids:
            return clusters_from_pairs(len(ids), [tuple(p) for p in kept["pairs"]])
    pairs = near_duplicate_pairs([load_image(i) for i in ids])
    if path is not None:
        atomic_write_text(path, json.dumps({"rule": rule, "ids": ids, "pairs": pairs}))
    return clusters_from_pairs(len(ids), pairs)
