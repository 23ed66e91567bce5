"""Near-duplicate detection: overlapping crops and resized copies found, different pictures not."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from kseg.data import duplicates
from kseg.data.duplicates import (
    clusters_from_pairs,
    near_duplicate_clusters,
    near_duplicate_pairs,
)


def nuclei(shape=(600, 800), count=220, seed=0) -> np.ndarray:
    """A fluorescence-like picture: bright ellipses of random size and brightness on black."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.uint8)
    for _ in range(count):
        centre = (int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0])))
        axes = (int(rng.integers(4, 12)), int(rng.integers(4, 12)))
        cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, int(rng.integers(80, 255)), -1)
    return cv2.GaussianBlur(image, (5, 5), 1.5)


def test_overlapping_crops_and_copies_are_paired():
    big = nuclei()
    images = [
        big[:300, :400],            # 0
        big[100:400, 150:550],      # 1: overlaps 0 by 200 x 250 px
        big[300:600, 400:800],      # 2: touches neither 0 nor 1
        cv2.resize(big[:300, :400], (200, 150), interpolation=cv2.INTER_AREA),  # 3: 0 at half size
        (big[300:600, :400] // 2),  # 4: a darker exposure of ...
        big[300:600, :400],         # 5: ... this one
        nuclei((300, 400), seed=1),  # 6: another picture
    ]
    pairs = near_duplicate_pairs(images)
    # 1 and 3 differ in scale (the search does not rescale): one cluster through 0 all the same.
    assert pairs == [(0, 1), (0, 3), (4, 5)]
    assert clusters_from_pairs(len(images), pairs) == [0, 0, 1, 0, 2, 2, 3]


def test_sparse_pictures_are_not_paired():
    """One lone nucleus matches another: the overlap check must reject it."""
    images = [nuclei((256, 256), count=6, seed=s) for s in range(6)]
    assert near_duplicate_pairs(images) == []


def test_small_overlap_is_not_a_duplicate():
    big = nuclei()
    # 100 x 400 px shared: below MIN_OVERLAP patches' area (192 x 192 px).
    assert near_duplicate_pairs([big[:300, :400], big[200:500, :400][:, ::-1].copy()]) == []
    assert near_duplicate_pairs([big[:300, :400], big[250:550, :400]]) == []


def test_other_groups_are_not_compared():
    big = nuclei()
    stained = np.full((300, 400, 3), 200, np.uint8)
    stained[..., 0] = 255 - big[:300, :400] // 2  # light background, coloured: a stained picture
    grey = np.repeat(big[:300, :400, None], 3, axis=2)
    assert near_duplicate_pairs([grey, stained]) == []


def test_clusters_are_connected_components():
    assert clusters_from_pairs(6, [(0, 3), (3, 5), (1, 2)]) == [0, 1, 1, 0, 2, 0]
    assert clusters_from_pairs(3, []) == [0, 1, 2]
    assert clusters_from_pairs(0, []) == []


def test_pairs_are_kept_beside_the_cache(tmp_path):
    big = nuclei()
    images = {"a": big[:300, :400], "b": big[100:400, 150:550], "c": big[300:600, 400:800]}
    assert near_duplicate_clusters(list(images), images.__getitem__, tmp_path) == [0, 0, 1]
    assert (tmp_path / duplicates.CACHE_NAME).is_file()

    def unreadable(sample_id):
        raise AssertionError("read again")

    assert near_duplicate_clusters(list(images), unreadable, tmp_path) == [0, 0, 1]
    with pytest.raises(AssertionError, match="read again"):  # other ids: searched afresh
        near_duplicate_clusters(["a", "b"], unreadable, tmp_path)


def test_real_overlapping_crops_found(shared_data):
    from kseg.io.dsb import DsbReader

    reader = DsbReader(shared_data / "dsb2018_stage1_train_sample" / "stage1_train", overlap="first")
    ids = reader.ids()
    images = [reader.load(i).image for i in ids[:12]]
    assert near_duplicate_pairs(images) == []  # twelve different stage-1 pictures
    big = max(images, key=lambda image: image.size)
    h, w = big.shape[:2]
    crops = [big[:h * 2 // 3, :w * 2 // 3], big[h // 3:, w // 3:], big[:h // 3, w * 2 // 3:]]
    assert near_duplicate_pairs(crops) == [(0, 1)]
