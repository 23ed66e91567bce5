"""Instance separation from probability maps, hole filling and small-object removal.

Expected values come from hand-built geometry: discs and rings drawn from their equations, pixel
counts computed independently by summing column heights, and bars of known length.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kseg.core.errors import ConfigError
from kseg.data.masks import clean_mask, remove_small_instances
from kseg.tasks.semantic.postprocess import instances_from_probabilities

SIZE = 64
RADIUS = 10
CENTRES = ((32, 23), (32, 41))  # 18 px apart: the discs overlap in a thin lens


def disc(centre, radius, size=SIZE):
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius * radius


def disc_pixel_count(radius: int) -> int:
    """Lattice points with dy^2 + dx^2 <= r^2, counted column by column."""
    return sum(2 * math.isqrt(radius * radius - dx * dx) + 1 for dx in range(-radius, radius + 1))


DISCS = tuple(disc(c, RADIUS) for c in CENTRES)
UNION = DISCS[0] | DISCS[1]
LENS = DISCS[0] & DISCS[1]


def two_disc_probabilities() -> np.ndarray:
    return np.where(UNION, 0.9, 0.05)


def assert_valid_labels(labels: np.ndarray, shape) -> None:
    assert labels.dtype == np.int32
    assert labels.shape == shape
    k = int(labels.max())
    assert sorted(np.unique(labels).tolist()) == list(range(k + 1))


def assert_matches_discs(labels: np.ndarray) -> None:
    """Exactly two instances, each centred on one disc and covering most of it."""
    assert labels.max() == 2
    matched = set()
    for k in (1, 2):
        ys, xs = np.nonzero(labels == k)
        centroid = np.array([ys.mean(), xs.mean()])
        distances = [np.hypot(*(centroid - np.array(c))) for c in CENTRES]
        j = int(np.argmin(distances))
        assert distances[j] < 2.0, (k, centroid)
        covered = np.count_nonzero((labels == k) & DISCS[j]) / np.count_nonzero(DISCS[j])
        assert covered > 0.8, (k, covered)
        matched.add(j)
    assert matched == {0, 1}
    # Together the instances are exactly the union of the discs.
    np.testing.assert_array_equal(labels > 0, UNION)


# --- the test geometry itself -------------------------------------------------------------------

def test_discs_overlap_into_one_blob():
    assert LENS.any()
    assert np.count_nonzero(DISCS[0]) == disc_pixel_count(RADIUS) == 317
    assert np.count_nonzero(UNION) == 2 * 317 - np.count_nonzero(LENS)


# --- instance separation ------------------------------------------------------------------------

def test_components_keeps_touching_discs_as_one_instance():
    labels = instances_from_probabilities(two_disc_probabilities(), method="components")
    assert_valid_labels(labels, (SIZE, SIZE))
    assert labels.max() == 1
    np.testing.assert_array_equal(labels == 1, UNION)


def test_distance_watershed_splits_touching_discs():
    labels = instances_from_probabilities(two_disc_probabilities(), method="distance")
    assert_valid_labels(labels, (SIZE, SIZE))
    assert_matches_discs(labels)


def test_markers_with_border_channel_splits_touching_discs():
    border = np.where(LENS, 0.95, 0.02)
    probabilities = np.dstack([two_disc_probabilities(), border])
    labels = instances_from_probabilities(probabilities, method="markers", second_channel="border")
    assert_valid_labels(labels, (SIZE, SIZE))
    assert_matches_discs(labels)


def test_markers_with_center_channel_splits_touching_discs():
    center = np.where(disc(CENTRES[0], 3) | disc(CENTRES[1], 3), 0.9, 0.02)
    probabilities = np.dstack([two_disc_probabilities(), center])
    labels = instances_from_probabilities(probabilities, method="markers", second_channel="center")
    assert_valid_labels(labels, (SIZE, SIZE))
    assert_matches_discs(labels)


def test_markers_without_seed_keeps_object_as_orphan():
    # A border channel high everywhere leaves no seed; the foreground still becomes one object.
    probabilities = np.dstack([two_disc_probabilities(), np.ones((SIZE, SIZE))])
    labels = instances_from_probabilities(probabilities, method="markers")
    assert_valid_labels(labels, (SIZE, SIZE))
    np.testing.assert_array_equal(labels == 1, UNION)


@pytest.mark.parametrize("method", ["components", "distance", "markers"])
def test_three_separate_objects_get_consecutive_labels(method):
    probabilities = np.zeros((SIZE, SIZE, 2))
    blobs = [disc((12, 12), 6), disc((12, 50), 5), disc((48, 30), 7)]
    for blob in blobs:
        probabilities[..., 0][blob] = 0.9
    labels = instances_from_probabilities(probabilities, method=method)
    assert_valid_labels(labels, (SIZE, SIZE))
    assert labels.max() == 3
    # Each object is exactly one instance.
    for blob in blobs:
        values = np.unique(labels[blob])
        assert values.size == 1 and values[0] > 0
    np.testing.assert_array_equal(labels > 0, blobs[0] | blobs[1] | blobs[2])


@pytest.mark.parametrize("method", ["components", "distance", "markers"])
def test_empty_probability_map_gives_all_zero_labels(method):
    probabilities = np.zeros((32, 32, 2), np.float32)
    labels = instances_from_probabilities(probabilities, method=method)
    assert labels.dtype == np.int32
    assert labels.shape == (32, 32)
    assert not labels.any()


def test_probabilities_at_threshold_are_background():
    labels = instances_from_probabilities(np.full((16, 16), 0.5), threshold=0.5)
    assert not labels.any()
    labels = instances_from_probabilities(np.full((16, 16), 0.51), threshold=0.5)
    assert labels.max() == 1 and np.count_nonzero(labels) == 256


def test_threshold_moves_the_object_boundary():
    # A radial ramp: probability 1 - d / 20 is above 0.5 exactly where d < 10.
    yy, xx = np.mgrid[:SIZE, :SIZE]
    d = np.hypot(yy - 32, xx - 32)
    probabilities = np.clip(1 - d / 20, 0, 1)
    labels = instances_from_probabilities(probabilities, threshold=0.5, min_size=0)
    np.testing.assert_array_equal(labels > 0, d < 10)


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["watershed", "Components", ""])
def test_unknown_method_raises_config_error(method):
    with pytest.raises(ConfigError):
        instances_from_probabilities(two_disc_probabilities(), method=method)


def test_markers_needs_a_second_channel():
    with pytest.raises(ConfigError):
        instances_from_probabilities(two_disc_probabilities(), method="markers")
    with pytest.raises(ConfigError):
        instances_from_probabilities(two_disc_probabilities()[..., None], method="markers")


def test_unknown_second_channel_raises_config_error():
    probabilities = np.dstack([two_disc_probabilities(), np.zeros((SIZE, SIZE))])
    with pytest.raises(ConfigError):
        instances_from_probabilities(probabilities, method="markers", second_channel="edge")


# --- hole filling -------------------------------------------------------------------------------

RING_OUTER, RING_INNER = 10, 5


def ring() -> tuple[np.ndarray, np.ndarray]:
    """(annulus, hole) centred in a 32 x 32 image."""
    outer = disc((16, 16), RING_OUTER, size=32)
    hole = disc((16, 16), RING_INNER, size=32)
    return outer & ~hole, hole


def test_clean_mask_fills_ring_hole():
    annulus, hole = ring()
    assert np.count_nonzero(annulus) == disc_pixel_count(RING_OUTER) - disc_pixel_count(RING_INNER)
    filled = clean_mask(annulus)
    assert filled.dtype == bool
    assert filled[hole].all()
    assert np.count_nonzero(filled) == disc_pixel_count(RING_OUTER)


def test_clean_mask_without_fill_keeps_ring_hole():
    annulus, hole = ring()
    kept = clean_mask(annulus, fill_holes=False)
    assert not kept[hole].any()
    np.testing.assert_array_equal(kept, annulus)


def test_thresholded_ring_becomes_filled_disc_instance():
    annulus, hole = ring()
    probabilities = np.where(annulus, 0.8, 0.1)
    labels = instances_from_probabilities(probabilities, method="components")
    assert labels.max() == 1
    assert (labels[hole] == 1).all()
    assert np.count_nonzero(labels) == disc_pixel_count(RING_OUTER)


def test_hole_touching_the_image_border_is_not_filled():
    # A "ring" cut by the image edge: the inside is connected to the outside, so it is no hole.
    mask = np.zeros((10, 10), bool)
    mask[0:6, 2] = mask[0:6, 6] = True
    mask[5, 2:7] = True
    np.testing.assert_array_equal(clean_mask(mask), mask)


# --- small-object removal -----------------------------------------------------------------------

MIN_SIZE = 8


def bars_image() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mask, small, kept): a 1 x 7 bar (min_size - 1 pixels) and a 2 x 4 block (min_size)."""
    small = np.zeros((32, 32), bool)
    small[4, 3:10] = True
    kept = np.zeros((32, 32), bool)
    kept[20:22, 20:24] = True
    return small | kept, small, kept


def test_clean_mask_drops_objects_below_min_size():
    mask, small, kept = bars_image()
    assert np.count_nonzero(small) == MIN_SIZE - 1 and np.count_nonzero(kept) == MIN_SIZE
    cleaned = clean_mask(mask, min_size=MIN_SIZE)
    np.testing.assert_array_equal(cleaned, kept)
    assert np.count_nonzero(cleaned) == MIN_SIZE


def test_clean_mask_min_size_zero_keeps_everything():
    mask, _, _ = bars_image()
    np.testing.assert_array_equal(clean_mask(mask, min_size=0), mask)
    single = np.zeros((5, 5), bool)
    single[2, 2] = True
    np.testing.assert_array_equal(clean_mask(single), single)


def test_clean_mask_counts_pieces_by_four_connectivity():
    # Two diagonal 4-pixel pieces touching at a corner are two objects of 4, not one of 8.
    mask = np.zeros((10, 10), bool)
    mask[2:4, 2:4] = True
    mask[4:6, 4:6] = True
    assert not clean_mask(mask, min_size=MIN_SIZE).any()


@pytest.mark.parametrize("method", ["components", "markers"])
def test_instances_drop_objects_below_min_size(method):
    mask, small, kept = bars_image()
    probabilities = np.dstack([np.where(mask, 0.9, 0.0), np.zeros(mask.shape)])
    labels = instances_from_probabilities(probabilities, method=method, min_size=MIN_SIZE)
    assert_valid_labels(labels, mask.shape)
    assert labels.max() == 1
    assert np.count_nonzero(labels) == MIN_SIZE
    np.testing.assert_array_equal(labels == 1, kept)


def test_distance_method_keeps_min_size_object_beside_large_one():
    # A large disc and a 2 x 4 block (exactly min_size pixels): the block must survive as an
    # instance, as it does with the other methods.
    probabilities = np.zeros((SIZE, SIZE))
    big = disc((20, 20), RADIUS)
    block = np.zeros((SIZE, SIZE), bool)
    block[50:52, 50:54] = True
    probabilities[big | block] = 0.9
    labels = instances_from_probabilities(probabilities, method="distance", min_size=MIN_SIZE)
    assert_valid_labels(labels, (SIZE, SIZE))
    assert labels.max() == 2
    np.testing.assert_array_equal(labels > 0, big | block)
    assert np.unique(labels[block]).size == 1


def test_remove_small_instances_renumbers_consecutively():
    labels = np.zeros((20, 20), np.int64)
    labels[0, 0:10] = 1   # 10 pixels: kept
    labels[2, 0:3] = 2    # 3 pixels: removed
    labels[4, 0:8] = 3    # 8 pixels (= min_size): kept
    labels[6, 0:7] = 4    # 7 pixels: removed
    labels[8, 0:9] = 7    # 9 pixels: kept (ids need not be consecutive)
    out = remove_small_instances(labels, MIN_SIZE)
    assert out.dtype == np.int32
    expected = np.zeros((20, 20), np.int32)
    expected[0, 0:10] = 1
    expected[4, 0:8] = 2
    expected[8, 0:9] = 3
    np.testing.assert_array_equal(out, expected)


def test_remove_small_instances_without_min_size_keeps_labels():
    labels = np.zeros((6, 6), np.int64)
    labels[0, 0] = 3
    labels[2, 2:4] = 5
    out = remove_small_instances(labels, 0)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, labels)
    empty = remove_small_instances(np.zeros((4, 4), np.uint8), 8)
    assert empty.dtype == np.int32 and not empty.any()


def test_remove_small_instances_can_remove_everything():
    labels = np.zeros((6, 6), np.int32)
    labels[0, 0:3] = 1
    labels[3, 0:2] = 2
    out = remove_small_instances(labels, 4)
    assert out.dtype == np.int32
    assert not out.any()
