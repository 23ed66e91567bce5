"""TensorBoard's truth panel: instances as coloured outlines on the input, not grey ids."""

from __future__ import annotations

import numpy as np

from kseg.core.pictures import outlined, picture_row


def test_outlines_are_drawn_on_the_boundary_in_each_instance_colour():
    image = np.zeros((12, 12), np.uint8)
    labels = np.zeros((12, 12), np.int32)
    labels[2:6, 2:6] = 1  # id 1: red
    labels[7:11, 7:11] = 2  # id 2: green
    rgb = outlined(image, labels)
    assert rgb.shape == (12, 12, 3) and rgb.dtype == np.uint8
    ring = np.zeros((12, 12), bool)
    ring[2:6, 2:6] = True
    ring[3:5, 3:5] = False
    assert (rgb[ring] == [255, 64, 64]).all()
    assert (rgb[3:5, 3:5] == 0).all(), "the inside stays the input"
    ring2 = np.zeros((12, 12), bool)
    ring2[7:11, 7:11] = True
    ring2[8:10, 8:10] = False
    assert (rgb[ring2] == [64, 255, 64]).all()
    coloured = (rgb != 0).any(axis=2)
    np.testing.assert_array_equal(coloured, ring | ring2)


def test_low_ids_are_as_visible_as_high_ones_in_the_picture_row():
    image = np.full((8, 8, 3), 40, np.uint8)
    labels = np.zeros((8, 8), np.int32)
    labels[1:4, 1:4] = 1
    labels[4:7, 4:7] = 300
    row = picture_row(image, labels, np.zeros((8, 8, 1), np.float32), np.ones((8, 8), np.float32))
    truth = row[:, 8 + 2:8 + 2 + 8]  # second panel
    assert truth[1, 1].tolist() == [255, 64, 64]
    assert truth[4, 4].tolist() != [0, 0, 0] and truth[4, 4].tolist() != truth[5, 5].tolist()
