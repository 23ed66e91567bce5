"""Keras batches from a preprocessed cache: per-epoch shuffling, crops, augmentation, targets.

Every random choice (the epoch's sample order, each sample's crop and augmentation) is derived from
``(seed, epoch, position)``, so batches are the same whichever worker process or thread builds
them and two runs with the same seed see the same data.

Batches are ``(inputs, targets, weights)`` as NumPy arrays:
``inputs`` float32 B x H x W x C in [0, 1], ``targets`` float32 B x H x W x T (see
:mod:`kseg.data.targets`), ``weights`` float32 B x H x W x 1 (the weight map; 0 on padding).
:meth:`SegmentationBatches.as_graph_inputs` turns one into the dict that a training model with the
weight map as an input takes.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Sequence

import albumentations as A
import keras
import numpy as np

from kseg.data.preprocess import PreprocessedDataset
from kseg.data.targets import make_targets

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
        self.epoch = 0
        self._order = self._epoch_order(0)

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
        self._order = self._epoch_order(self.epoch)

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


class SegmentationBatches(SeededEpochs, keras.utils.PyDataset):
    """Batches for ``model.fit``.

    ``steps_per_epoch`` fixes the epoch length in batches (samples repeat in fresh permutations when
    it asks for more than one pass), so ``model.fit`` never runs out of data.

    Training (``crop_size`` set): each sample is randomly cropped to ``crop_size`` (zero-padded
    with weight 0 when smaller), then augmented. Evaluation (``crop_size=None``): whole images,
    each batch zero-padded to a common size that is a multiple of ``pad_multiple`` (2**depth for a
    U-Net), again with weight 0 on the padding.
    """

    def __init__(
        self,
        data: PreprocessedDataset,
        ids: Sequence[str] | None = None,
        *,
        batch_size: int = 8,
        crop_size: tuple[int, int] | None = None,
        augment: A.Compose | None = None,
        targets: str = "mask",
        border_width: int = 2,
        pad_multiple: int = 16,
        shuffle: bool = True,
        seed: int = 0,
        output: str = "tuple",
        in_memory: bool | None = None,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
        steps_per_epoch: int | None = None,
    ):
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size)
        if output not in ("tuple", "graph"):
            raise ValueError(f"output must be 'tuple' or 'graph', not {output!r}")
        self.data = data
        self._init_epochs(data.ids if ids is None else ids, augment=augment, batch_size=batch_size, shuffle=shuffle,
                          seed=seed, steps_per_epoch=steps_per_epoch)
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.targets = targets
        self.border_width = border_width
        self.pad_multiple = int(pad_multiple)
        self.output = output
        self.is_instance = data.kind == "instance"
        self._init_cache(data.load, in_memory=in_memory, file_bytes=lambda i: data.path(i).stat().st_size)

    # -- keras.utils.PyDataset ------------------------------------------------------------------
    def __getitem__(self, index: int):
        if index >= len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        start = index * self.batch_size
        positions = range(start, min(start + self.batch_size, len(self._order)))
        samples = [self.sample(position) for position in positions]
        batch = self._collate(samples)
        return self.as_graph_inputs(batch) if self.output == "graph" else batch

    # -- pieces ---------------------------------------------------------------------------------
    def sample(self, position: int) -> dict[str, np.ndarray]:
        """The image, target and weight of the epoch's ``position``-th sample, augmented."""
        arrays = self._load(self.ids[self._order[position]])
        image, target = arrays["image"], arrays["target"]
        weight = arrays.get("weight")
        if weight is None:
            weight = np.ones(target.shape, np.float32)
        if self.augment is not None:
            sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, position]).generate_state(1)[0])
            augment = self._thread_augment()
            augment.set_random_seed(sample_seed)
            out = augment(image=image, mask=target, weight=weight)
            image, target, weight = out["image"], out["mask"], out["weight"]
        if image.ndim == 2:
            image = image[..., None]
        return {
            "image": image,
            "target": make_targets(target, self.targets, self.is_instance, self.border_width),
            "weight": weight.astype(np.float32)[..., None],
        }

    def _collate(self, samples: list[dict[str, np.ndarray]]):
        height = max(s["image"].shape[0] for s in samples)
        width = max(s["image"].shape[1] for s in samples)
        if self.crop_size is None:
            height = -(-height // self.pad_multiple) * self.pad_multiple
            width = -(-width // self.pad_multiple) * self.pad_multiple
        batch = {}
        for key in ("image", "target", "weight"):
            first = samples[0][key]
            out = np.zeros((len(samples), height, width, first.shape[-1]), np.float32)
            for row, s in enumerate(samples):
                h, w = s[key].shape[:2]
                out[row, :h, :w] = s[key]
            batch[key] = out
        batch["image"] *= np.float32(1 / 255)
        return batch["image"], batch["target"], batch["weight"]

    @staticmethod
    def as_graph_inputs(batch) -> dict[str, np.ndarray]:
        """``(image, target, weight)`` -> the inputs of a training model that owns its loss."""
        image, target, weight = batch
        return {"image": image, "target": target, "weight_map": weight}
