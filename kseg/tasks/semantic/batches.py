"""Batches of the semantic family: augmented training crops with their per-pixel targets and
weight maps, and whole-image validation batches (zero-padded to the model's divisor).

``output="graph"`` yields the ``{"image", "weight_map", "target"}`` dict the weight-map training
graph takes; ``"tuple"`` yields ``(image, target, weight)`` for inspection (``make demo``).
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import keras
import numpy as np

from kseg.core.config import Config
from kseg.data.augment import build_augmentation
from kseg.data.generator import SeededEpochs
from kseg.data.preprocess import PreprocessedDataset
from kseg.tasks.semantic.targets import make_targets


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

    # -- batches (keras.utils.PyDataset's __getitem__ is batch_at of the current epoch) ----------
    def batch_at(self, epoch: int, index: int):
        samples = [self.sample(position, epoch) for position in self.positions(index)]
        batch = self._collate(samples)
        return self.as_graph_inputs(batch) if self.output == "graph" else batch

    # -- pieces ---------------------------------------------------------------------------------
    def sample(self, position: int, epoch: int | None = None) -> dict[str, np.ndarray]:
        """The image, target and weight of the ``position``-th sample of ``epoch`` (the current one
        by default), augmented."""
        epoch = self.epoch if epoch is None else epoch
        arrays = self._load(self.ids[self.order(epoch)[position]])
        image, target = arrays["image"], arrays["target"]
        weight = arrays.get("weight")
        if weight is None:
            weight = np.ones(target.shape, np.float32)
        if self.augment is not None:
            sample_seed = int(np.random.SeedSequence([self.seed, epoch, position]).generate_state(1)[0])
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


def make_batches(cfg: Config, data: PreprocessedDataset, train_ids, valid_ids, *, pad_multiple: int = 16,
                 output: str = "tuple") -> tuple[SegmentationBatches, SegmentationBatches]:
    """Augmented training crops and whole-image validation batches."""
    g = cfg.generator
    crop = tuple(g.crop_size) if g.crop_size else None
    common = dict(targets=g.targets, border_width=g.border_width, output=output, pad_multiple=pad_multiple)
    train = SegmentationBatches(
        data, train_ids, batch_size=g.batch_size, crop_size=crop, seed=g.seed, shuffle=True,
        augment=build_augmentation(cfg.augment.pipeline, crop_size=crop, seed=g.seed, seeding=cfg.augment.seeding),
        workers=g.workers, use_multiprocessing=g.use_multiprocessing, max_queue_size=g.max_queue_size,
        steps_per_epoch=cfg.train.get("steps_per_epoch"), **common)
    valid = SegmentationBatches(data, valid_ids, batch_size=1, crop_size=None, shuffle=False, seed=g.seed, **common)
    return train, valid
