"""Training batches built ahead of the step that takes them, by workers that live for the whole run.

Keras' own ``PyDataset`` workers start a new pool every epoch (with processes: new processes, each
sent the dataset again) and stop at each epoch's end, so every epoch starts on an empty queue and
the accelerator waits for its first batches. Here the batches object says what a batch *is* --
``batch_at(epoch, index)``, a pure function of its arguments -- and one pool, started with the
first batch, builds the batches expected next, over epoch boundaries and while validation runs. A
wrong guess costs only the work: the model always gets ``batch_at`` of the batch it asked for.

The order of an epoch's batches is drawn as Keras draws it for a shuffled ``PyDataset``
(``random.shuffle`` of the batch indices when the epoch begins, see ``fit(shuffle=True)``), so a
run's data -- and a resumed run's, whose Python random state is restored -- is what Keras' own
loop gives. Pass ``shuffle=False`` to ``fit``: the order is drawn here.
"""

from __future__ import annotations

import concurrent.futures
import random
import threading
import weakref

import keras

_WORKER_BATCHES = None  # a worker process's copy of the batches object


def _install(batches) -> None:
    global _WORKER_BATCHES
    _WORKER_BATCHES = batches


def _build_in_worker(epoch: int, index: int):
    return _WORKER_BATCHES.batch_at(epoch, index)


class PrefetchedBatches(keras.utils.PyDataset):
    """``batches`` (a ``PyDataset`` with ``epoch`` and ``batch_at(epoch, index)``) built by
    ``workers`` threads, or processes with ``processes=True``, up to ``depth`` batches ahead."""

    def __init__(self, batches, *, workers: int = 1, processes: bool = False, depth: int = 10,
                 shuffle: bool = True):
        super().__init__()
        self.batches = batches
        self.pool_workers = max(1, int(workers))
        self.processes = bool(processes)
        self.depth = max(1, int(depth))
        self.shuffle = bool(shuffle)
        self._batch_order: list[int] | None = None
        self._next_order: tuple[int, list[int]] | None = None
        self._pending: dict[tuple[int, int], concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._executor = None

    @classmethod
    def of(cls, batches, *, shuffle: bool = True) -> PrefetchedBatches:
        """Wrap ``batches`` with the worker settings it was given as a ``PyDataset``."""
        return cls(batches, workers=batches.workers, processes=batches.use_multiprocessing,
                   depth=batches.max_queue_size, shuffle=shuffle)

    # -- keras.utils.PyDataset ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.batches)

    def on_epoch_begin(self) -> None:
        self.batches.on_epoch_begin()
        self._batch_order = list(range(len(self)))
        if self.shuffle:
            random.shuffle(self._batch_order)

    def on_epoch_end(self) -> None:
        self.batches.on_epoch_end()

    def __getitem__(self, position: int):
        """The epoch's ``position``-th batch in its drawn order (in index order before the first
        epoch begins, when Keras looks at two batches for their shapes)."""
        if position >= len(self):
            raise IndexError(f"batch {position} of {len(self)}")
        order = self._batch_order or list(range(len(self)))
        epoch = self.batches.epoch
        key = (epoch, order[position])
        ahead = [(epoch, index) for index in order[position + 1: position + 1 + self.depth]]
        if len(ahead) < self.depth and self._batch_order is not None:
            following = self._predicted_order(epoch + 1)
            ahead += [(epoch + 1, index) for index in following[: self.depth - len(ahead)]]
        with self._lock:
            future = self._pending.pop(key, None) or self._submit(key)
            wanted = set(ahead)
            for stale in [k for k in self._pending if k not in wanted]:
                self._pending.pop(stale).cancel()
            for k in ahead:
                if k not in self._pending:
                    self._pending[k] = self._submit(k)
        return future.result()

    # -- the pool -----------------------------------------------------------------------------
    def _predicted_order(self, epoch: int) -> list[int]:
        """The order ``on_epoch_begin`` will draw for ``epoch`` if nothing else draws from Python's
        ``random`` meanwhile (read from a copy of its state; the real draw is made then)."""
        if self._next_order is None or self._next_order[0] != epoch:
            order = list(range(len(self)))
            if self.shuffle:
                peek = random.Random()
                peek.setstate(random.getstate())
                peek.shuffle(order)
            self._next_order = (epoch, order)
        return self._next_order[1]

    def _submit(self, key: tuple[int, int]) -> concurrent.futures.Future:
        if self._executor is None:
            if self.processes:
                # The batches object reaches the processes once, when they start (not every epoch).
                executor = concurrent.futures.ProcessPoolExecutor(self.pool_workers, initializer=_install,
                                                                  initargs=(self.batches,))
            else:
                executor = concurrent.futures.ThreadPoolExecutor(self.pool_workers,
                                                                 thread_name_prefix="kseg-batches")
            self._executor = executor
            weakref.finalize(self, executor.shutdown, wait=False, cancel_futures=True)
        if self.processes:
            return self._executor.submit(_build_in_worker, *key)
        return self._executor.submit(self.batches.batch_at, *key)

    def close(self) -> None:
        """Stop the workers (batches built ahead and not taken are dropped)."""
        with self._lock:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
