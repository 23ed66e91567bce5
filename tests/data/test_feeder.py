"""Batches built ahead by a persistent pool: the same batches, in the same order, as Keras' own
shuffled PyDataset loop; the pool is started once for the whole run; the next epoch's first batches
are built before that epoch begins; a worker's error reaches the training loop."""

from __future__ import annotations

import os
import random
import threading
import time

import keras
import numpy as np
import pytest
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

from kseg.data.feeder import PrefetchedBatches
from kseg.data.generator import SeededEpochs

N_BATCHES = 5


class Recorded(SeededEpochs, keras.utils.PyDataset):
    """Batch ``index`` of ``epoch`` is an array naming both (and the sample ids of its rows) plus
    the building process's pid; every build is recorded (thread path only)."""

    def __init__(self, fail_at=None, **kwargs):
        super().__init__(**kwargs)
        self._init_epochs([f"s{i}" for i in range(2 * N_BATCHES)], augment=None, batch_size=2, shuffle=True,
                          seed=5, steps_per_epoch=None)
        self.fail_at = fail_at
        self.builds: list[tuple[int, int]] = []
        self._record = threading.Lock()

    def batch_at(self, epoch, index):
        if (epoch, index) == self.fail_at:
            raise ValueError(f"cannot read image of batch {index}")
        with self._record:
            self.builds.append((epoch, index))
        rows = self.order(epoch)[list(self.positions(index))]
        return np.array([[epoch, index, *rows, os.getpid()]], np.int64), np.zeros((1, 1), np.float32)


def _epochs(dataset, epochs: int, *, shuffle: bool, pause: float = 0.0):
    """Batches of ``epochs`` epochs through Keras' PyDataset loop (what ``fit`` runs), with
    ``pause`` seconds between epochs (validation)."""
    adapter = PyDatasetAdapter(dataset, shuffle=shuffle)
    seen = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch) if hasattr(dataset, "set_epoch") else dataset.batches.set_epoch(epoch)
        adapter.on_epoch_begin()
        seen.append([x[0] for x, _ in adapter.get_numpy_iterator()])
        adapter.on_epoch_end()
        time.sleep(pause)
    return seen


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_same_batches_in_the_same_order_as_keras_own_shuffled_loop(processes):
    random.seed(11)
    expected = _epochs(Recorded(), 3, shuffle=True)
    random.seed(11)
    fed = PrefetchedBatches(Recorded(), workers=2, processes=processes, depth=3)
    try:
        got = _epochs(fed, 3, shuffle=False)
    finally:
        fed.close()
    assert [[tuple(row[:4]) for row in epoch] for epoch in got] == \
        [[tuple(row[:4]) for row in epoch] for epoch in expected]
    # Every epoch is a permutation of its batches, and epochs differ in order and content.
    assert all(sorted(row[1] for row in epoch) == list(range(N_BATCHES)) for epoch in got)
    assert [row[1] for row in got[0]] != [row[1] for row in got[1]]
    pids = {int(row[-1]) for epoch in got for row in epoch}
    if processes:
        assert os.getpid() not in pids and len(pids) <= 2  # two processes for three epochs
    else:
        assert pids == {os.getpid()}


def test_next_epoch_is_built_during_the_pause_and_nothing_twice():
    random.seed(3)
    inner = Recorded()
    fed = PrefetchedBatches(inner, workers=2, depth=2)
    adapter = PyDatasetAdapter(fed, shuffle=False)
    try:
        inner.set_epoch(0)
        adapter.on_epoch_begin()
        first = [x[0] for x, _ in adapter.get_numpy_iterator()]
        adapter.on_epoch_end()
        time.sleep(0.5)  # validation: the pool works on epoch 1 meanwhile
        built_during_pause = [key for key in inner.builds if key[0] == 1]
        inner.set_epoch(1)
        adapter.on_epoch_begin()
        second = [x[0] for x, _ in adapter.get_numpy_iterator()]
        adapter.on_epoch_end()
    finally:
        fed.close()
    assert {(1, int(row[1])) for row in second[:2]} == set(built_during_pause)
    taken = [(int(row[0]), int(row[1])) for row in first + second]
    assert len(set(inner.builds)) == len(inner.builds)  # no batch was built twice
    assert set(taken) <= set(inner.builds) and len(inner.builds) <= len(taken) + 2  # + the look-ahead


def test_a_wrong_guess_costs_work_not_data():
    random.seed(3)
    inner = Recorded()
    fed = PrefetchedBatches(inner, workers=1, depth=3)
    adapter = PyDatasetAdapter(fed, shuffle=False)
    try:
        adapter.on_epoch_begin()
        list(adapter.get_numpy_iterator())
        adapter.on_epoch_end()
        random.random()  # something else draws from Python's random: the predicted order is wrong
        inner.set_epoch(4)  # and a resumed run jumps to another epoch
        adapter.on_epoch_begin()
        got = [x[0] for x, _ in adapter.get_numpy_iterator()]
        adapter.on_epoch_end()
    finally:
        fed.close()
    reference = Recorded()
    for row, index in zip(got, fed._batch_order):
        np.testing.assert_array_equal(row, reference.batch_at(4, index)[0][0])


def test_a_worker_error_reaches_the_loop_and_the_pool_stops():
    fed = PrefetchedBatches(Recorded(fail_at=(0, 3)), workers=2, depth=4, shuffle=False)
    adapter = PyDatasetAdapter(fed, shuffle=False)
    adapter.on_epoch_begin()
    with pytest.raises(ValueError, match="cannot read image of batch 3"):
        list(adapter.get_numpy_iterator())
    fed.close()
    assert fed._executor is None and not fed._pending
