"""Augmentation keeps image, labels and weight map aligned; batches are deterministic."""

from __future__ import annotations

import numpy as np
import pytest
from test_preprocess import FakeReader, disks

from kseg.core.errors import ConfigError
from kseg.data.augment import build_augmentation
from kseg.data.preprocess import PreprocessSettings, preprocess
from kseg.tasks.semantic.batches import SegmentationBatches
from kseg.tasks.semantic.targets import (
    instance_borders,
    instance_centers,
    make_targets,
    n_target_channels,
)


def derived_sample(seed=0, shape=(70, 90)):
    """Labels of random disks; the image and the weight map are computed *from* the labels."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(8, min(shape) - 8, size=(6, 2))
    labels = disks(shape, [tuple(c) for c in centres], 6)
    image = np.repeat(np.where(labels > 0, 230, 25)[..., None], 3, axis=2).astype(np.uint8)
    weight = np.where(labels > 0, 2.0, 1.0).astype(np.float32)
    return image, labels, weight


@pytest.mark.parametrize("preset", ["flips", "microscopy", "natural"])
def test_augmentation_moves_image_labels_and_weights_together(preset):
    pipeline = build_augmentation(preset, crop_size=(48, 64), seed=3)
    for seed in range(12):
        image, labels, weight = derived_sample(seed)
        out = pipeline(image=image, mask=labels, weight=weight)
        img, lab, w = out["image"], out["mask"], out["weight"]
        assert img.shape[:2] == lab.shape == w.shape == (48, 64)
        assert lab.dtype == labels.dtype and set(np.unique(lab)) <= set(np.unique(labels))
        # Nearest-neighbour targets share the random parameters exactly: the weight map still says
        # where the labels are, and pixels from outside the image carry weight 0.
        inside = w > 0
        np.testing.assert_array_equal(w[inside] == 2.0, lab[inside] > 0)
        # The image (linear interpolation, colour changes) agrees away from object edges.
        grey = img.mean(axis=2)
        core = inside & ~instance_borders(np.where(inside, lab, 0), width=2)
        bright = grey[core] > 127
        assert (bright == (lab[core] > 0)).mean() > 0.97


def test_custom_pipeline_from_config_and_bad_names():
    pipeline = build_augmentation([{"name": "HorizontalFlip", "p": 1.0},
                                   {"name": "OneOf", "transforms": [{"name": "VerticalFlip", "p": 1}], "p": 1.0}])
    image, labels, weight = derived_sample()
    out = pipeline(image=image, mask=labels, weight=weight)
    np.testing.assert_array_equal(out["mask"], labels[::-1, ::-1])
    with pytest.raises(ConfigError, match="not an albumentations transform"):
        build_augmentation([{"name": "NoSuchFlip"}])
    with pytest.raises(ConfigError, match="not a preset"):
        build_augmentation("fancy")


def test_targets_channels():
    labels = np.zeros((12, 12), np.int32)
    labels[2:6, 2:10] = 1
    labels[6:10, 2:10] = 4  # touches instance 1
    border = instance_borders(labels, width=1)
    assert border[5, 5] and border[6, 5] and border[2, 5]  # shared edge and outer edge
    assert not border[3:5, 3:9].any()
    centers = instance_centers(labels)
    assert centers[3:5, 4:8].any() and centers[7:9, 4:8].any() and not centers[labels == 0].any()
    two = make_targets(labels, "mask+border", is_instance=True)
    assert two.shape == (12, 12, 2) and two.dtype == np.float32
    np.testing.assert_array_equal(two[..., 0], labels > 0)
    assert n_target_channels("mask+center") == 2
    with pytest.raises(ConfigError):
        make_targets(labels.astype(np.uint8), "mask+border", is_instance=False)


@pytest.fixture
def cached(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    reader = FakeReader(folder, n=5)
    return preprocess(reader, PreprocessSettings(n_jobs=1, cache_dir=str(tmp_path / "c"), progress=False))


def test_training_batches_shapes_and_determinism(cached):
    def make(seed):
        return SegmentationBatches(cached, batch_size=2, crop_size=(32, 32), seed=seed,
                                   augment=build_augmentation("microscopy", crop_size=(32, 32)),
                                   targets="mask+border")
    a, b = make(7), make(7)
    assert len(a) == 3
    x, y, w = a[0]
    assert x.shape == (2, 32, 32, 3) and y.shape == (2, 32, 32, 2) and w.shape == (2, 32, 32, 1)
    assert x.dtype == y.dtype == w.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    last = a[2]
    assert last[0].shape[0] == 1
    for left, right in zip(a[1], b[1]):
        np.testing.assert_array_equal(left, right)
    first_epoch = a[0][0]
    a.on_epoch_end()
    assert not np.array_equal(first_epoch, a[0][0])  # new order and new augmentation
    b.set_epoch(1)
    np.testing.assert_array_equal(a[0][0], b[0][0])  # a resumed run sees the same epoch
    assert not np.array_equal(make(8)[0][0], make(7)[0][0])


def test_steps_per_epoch_repeats_the_samples_in_fresh_permutations(cached):
    crop = build_augmentation("none", crop_size=(32, 32))
    batches = SegmentationBatches(cached, batch_size=2, crop_size=(32, 32), augment=crop, seed=3, steps_per_epoch=6)
    assert len(batches) == 6  # 12 samples from 5 images: fit never runs out of data
    order = batches.order(batches.epoch)
    assert order.size == 12
    # Every complete pass is a permutation of all five samples; passes differ.
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5))
    assert not np.array_equal(order[:5], order[5:10])
    assert all(batches[i][0].shape == (2, 32, 32, 3) for i in range(6))
    with pytest.raises(IndexError):
        batches[6]
    again = SegmentationBatches(cached, batch_size=2, crop_size=(32, 32), augment=crop, seed=3, steps_per_epoch=6)
    np.testing.assert_array_equal(again.order(again.epoch), order)
    batches.on_epoch_end()
    assert not np.array_equal(batches.order(batches.epoch), order)


def test_validation_batches_pad_to_multiple_with_zero_weight(cached):
    batches = SegmentationBatches(cached, batch_size=5, crop_size=None, shuffle=False, pad_multiple=16)
    x, y, w = batches[0]
    assert x.shape == (5, 48, 48, 3)  # heights 40..44 and width 48, padded to multiples of 16
    assert (w[0, 40:] == 0).all() and (w[0, :40] > 0).all()
    np.testing.assert_array_equal(y[4, :44, :, 0], cached.load("img4")["target"] > 0)
    graph = batches.as_graph_inputs(batches[0])
    assert set(graph) == {"image", "target", "weight_map"}


@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
def test_workers_give_the_same_batches(cached, processes):
    kwargs = dict(batch_size=2, crop_size=(32, 32), seed=1, steps_per_epoch=12,
                  augment=build_augmentation("microscopy", crop_size=(32, 32)))
    serial = SegmentationBatches(cached, **kwargs)
    parallel = SegmentationBatches(cached, workers=2, use_multiprocessing=processes, **kwargs)
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    adapter = PyDatasetAdapter(parallel, shuffle=False)
    adapter.on_epoch_begin()
    got = list(adapter.get_numpy_iterator())
    adapter.on_epoch_end()
    assert len(got) == len(serial)
    for batch, index in zip(got, range(len(serial))):
        for left, right in zip(batch, serial[index]):
            np.testing.assert_array_equal(left, right)
