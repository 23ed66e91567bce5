"""Seeded epochs for every family's batches, and the settings they take from the config.

Every random choice (the epoch's sample order, each sample's crop and augmentation) is derived from
``(seed, epoch, position)``, so batches are the same whichever worker process or thread builds
them, two runs with the same seed see the same data, and a resumed epoch replays its data. Samples
come from one in-memory cache shared by the families' batch classes, within a size limit.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Sequence

import albumentations as A
import keras
import numpy as np

from kseg.core.errors import ConfigError

IN_MEMORY_LIMIT_BYTES = 2 * 1024**3


def epoch_order(n: int, epoch: int, *, seed: int, shuffle: bool, steps_per_epoch: int | None,
                batch_size: int) -> np.ndarray:
    """Sample indices of one epoch: one pass, or as many passes as ``steps_per_epoch`` needs,
    each a fresh permutation derived from ``(seed, epoch, pass)``."""
    passes = 1 if not steps_per_epoch else math.ceil(steps_per_epoch * batch_size / n)
    if not shuffle:
        order = np.tile(np.arange(n), passes)
    elif passes == 1:
        order = np.random.default_rng([seed, epoch]).permutation(n)
    else:
        order = np.concatenate([np.random.default_rng([seed, epoch, k]).permutation(n) for k in range(passes)])
    return order[: steps_per_epoch * batch_size] if steps_per_epoch else order


class SeededEpochs:
    """Epoch bookkeeping of the batch generators: the epoch's sample order, jumping to an epoch on
    resume, and one augmentation pipeline per worker thread. Needs ``ids``, ``seed``, ``shuffle``,
    ``steps_per_epoch``, ``batch_size`` and ``augment`` attributes."""

    def _init_epochs(self, ids: Sequence[str], *, augment, batch_size: int, shuffle: bool, seed: int,
                     steps_per_epoch: int | None) -> None:
        """Set the attributes this mixin needs and the first epoch's order."""
        self.ids = list(ids)
        if not self.ids:
            raise ValueError(f"{type(self).__name__} needs at least one sample id")
        self.augment = augment
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.steps_per_epoch = int(steps_per_epoch) if steps_per_epoch else None
        # Training batches (shuffled) are split between the processes of a multi-process job;
        # evaluation batches (in order) are read whole by each process that scores.
        self.shard = process_shard() if self.shuffle else (0, 1)
        index, count = self.shard
        if count > 1:
            if self.batch_size % count:
                raise ConfigError(f"generator.batch_size={self.batch_size} is the global batch of {count} processes: "
                                  f"make it a multiple of {count}")
            # Every process must run the same steps on equal shards: the last batch is filled up from
            # the next pass's order instead of being cut short.
            self.steps_per_epoch = self.steps_per_epoch or math.ceil(len(self.ids) / self.batch_size)
        self.epoch = 0
        self._orders: dict[int, np.ndarray] = {}
        self._epoch_length = len(self.order(0))  # positions per epoch, the same in every epoch

    def order(self, epoch: int) -> np.ndarray:
        """Sample indices of ``epoch`` in the order its batches take them (the last few epochs'
        orders are kept: workers building ahead ask for the next epoch's while this one runs)."""
        order = self._orders.get(epoch)
        if order is None:
            order = self._epoch_order(epoch)
            orders = dict(self._orders)  # replaced whole, so threads reading it never see it change
            orders[epoch] = order
            self._orders = {key: orders[key] for key in sorted(orders)[-4:]}
        return order

    def __getitem__(self, index: int):
        if index >= len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        return self.batch_at(self.epoch, index)

    def batch_at(self, epoch: int, index: int):
        """Batch ``index`` of ``epoch``: a pure function of its arguments, so any worker may build
        any batch at any time (ahead of the step that takes it) and get the same arrays."""
        raise NotImplementedError

    def positions(self, index: int) -> range:
        """Positions in the epoch's order of batch ``index`` -- in a multi-process job, of this
        process's slice of that global batch (each process builds only its own rows)."""
        start = index * self.batch_size
        stop = min(start + self.batch_size, self._epoch_length)
        shard, count = self.shard
        if count == 1:
            return range(start, stop)
        rows = self.batch_size // count
        return range(start + shard * rows, min(start + (shard + 1) * rows, stop))

    def _init_cache(self, load, *, in_memory: bool | None = None, file_bytes=None, loaded_bytes=None) -> None:
        """Keep every sample in memory when they fit in ``IN_MEMORY_LIMIT_BYTES`` (``in_memory``
        forces either way). ``file_bytes(id)`` sizes them without loading (cache files); without
        it samples are loaded one by one and caching stops as soon as ``loaded_bytes(sample)``
        passes the limit, so an over-large dataset is never held whole."""
        self._load_sample = load
        self._cache = None
        if in_memory is False:
            return
        if in_memory is None and file_bytes is not None:
            if sum(file_bytes(i) for i in self.ids) >= IN_MEMORY_LIMIT_BYTES:
                return
            in_memory = True
        cache, total = {}, 0
        for sample_id in self.ids:
            cache[sample_id] = load(sample_id)
            if not in_memory:
                total += loaded_bytes(cache[sample_id])
                if total >= IN_MEMORY_LIMIT_BYTES:
                    return
        self._cache = cache

    def _load(self, sample_id: str):
        return self._cache[sample_id] if self._cache is not None else self._load_sample(sample_id)

    def __len__(self) -> int:
        return self.steps_per_epoch or math.ceil(len(self.ids) / self.batch_size)

    def on_epoch_end(self) -> None:
        # Called in the main process; Keras hands the updated object to fresh workers each epoch.
        self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        """Jump to an epoch (a resumed run continues with that epoch's order and augmentation)."""
        self.epoch = int(epoch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.ids), epoch, seed=self.seed, shuffle=self.shuffle,
                           steps_per_epoch=self.steps_per_epoch, batch_size=self.batch_size)

    def _thread_augment(self) -> A.Compose:
        """This thread's own copy of the pipeline: seeding then calling a shared one would race
        between worker threads and break the seed -> augmentation contract."""
        if threading.current_thread() is threading.main_thread():
            return self.augment
        key = threading.get_ident()
        copies = self.__dict__.setdefault("_augment_copies", {})
        if key not in copies:
            copies[key] = copy.deepcopy(self.augment)
        return copies[key]


def process_shard() -> tuple[int, int]:
    """``(this process's index, process count)`` of a multi-process data-parallel job (the JAX
    backend under ``keras.distribution``, see ``kseg.engine.distribute``); ``(0, 1)`` otherwise.
    Each process then feeds its own rows of every global batch and Keras assembles the batch."""
    if keras.backend.backend() != "jax" or keras.distribution.distribution() is None:
        return 0, 1
    import jax

    return jax.process_index(), jax.process_count()


def batch_options(cfg) -> dict:
    """The generator settings every family's training batches take from ``cfg``."""
    g = cfg.generator
    return dict(seed=int(g.seed), steps_per_epoch=cfg.train.steps_per_epoch, workers=int(g.workers),
                use_multiprocessing=bool(g.use_multiprocessing), max_queue_size=int(g.max_queue_size))
