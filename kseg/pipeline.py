"""Wiring a resolved config to the data path: root -> reader -> cache -> folds -> batches.

The CLI and the training loop call these; each step is a plain function of the config so a
notebook can run the same pipeline piece by piece.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from kseg.config import Config, project_path
from kseg.data.augment import build_augmentation
from kseg.data.generator import SegmentationBatches
from kseg.data.preprocess import PreprocessedDataset, PreprocessSettings, preprocess
from kseg.errors import ConfigError, DataError


def data_root(cfg: Config) -> Path:
    """The dataset folder; the synthetic demo is generated there on first use."""
    if not cfg.dataset.root:
        raise ConfigError(f"dataset {cfg.dataset.name!r} has no root: pass DATA=path (or --data path)")
    root = project_path(cfg.dataset.root)
    if cfg.dataset.demo:
        from kseg.io.demo import write_demo_dataset

        if not root.is_dir() or not any(root.iterdir()):
            print(f"writing the synthetic demo competition to {root}", file=sys.stderr)
        write_demo_dataset(root, **dict(cfg.dataset.get("demo_args", {}) or {}))
    if not root.is_dir():
        raise DataError(f"dataset folder does not exist (dataset {cfg.dataset.name!r}; set DATA=path)", root)
    return root


def train_reader(cfg: Config):
    """The reader for the labelled part of the dataset, chosen by ``dataset.layout``."""
    from kseg.io.readers import open_dataset

    root = data_root(cfg)
    section = cfg.dataset
    options = dict(section.options or {})
    train = root / section.train if section.train else root
    masks = root / section.masks if section.masks else None
    return open_dataset(section.layout, train, masks=masks, **options)


def preprocess_settings(cfg: Config) -> PreprocessSettings:
    return PreprocessSettings.from_config(cfg.preprocess)


def preprocess_train(cfg: Config) -> PreprocessedDataset:
    """Preprocess (or read from the cache) every labelled sample."""
    return preprocess(train_reader(cfg), preprocess_settings(cfg))


def strata(data: PreprocessedDataset, root: Path | None = None) -> list[str]:
    """A stratum per sample for k-fold splits: the image style when the dataset records it
    (the demo does), else the mask-coverage decile (the TGS Salt recipe)."""
    styles = {}
    if root is not None and (root / "styles.json").is_file():
        styles = json.loads((root / "styles.json").read_text())
    if styles and all(i in styles for i in data.ids):
        return [str(styles[i]) for i in data.ids]
    coverage = []
    for sample_id in data.ids:
        target = data.load(sample_id).get("target")
        coverage.append(0.0 if target is None else float((target > 0).mean()))
    return [str(int(min(c, 0.999) * 10)) for c in coverage]


def kfold_split(ids: list[str], n_folds: int, fold: int, seed: int, groups: list[str] | None = None):
    """(train ids, validation ids) of ``fold``: stratified round-robin within each group."""
    if not 0 <= fold < n_folds:
        raise ConfigError(f"split.fold={fold} is outside 0..{n_folds - 1}")
    if n_folds < 2:
        raise ConfigError(f"split.n_folds must be at least 2, not {n_folds}")
    groups = groups or ["all"] * len(ids)
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(ids), int)
    offset = 0
    for group in sorted(set(groups)):
        members = np.flatnonzero(np.asarray(groups) == group)
        members = members[rng.permutation(members.size)]
        assignment[members] = (np.arange(members.size) + offset) % n_folds
        offset += members.size  # keeps fold sizes balanced across small groups
    train = [i for i, f in zip(ids, assignment) if f != fold]
    valid = [i for i, f in zip(ids, assignment) if f == fold]
    return train, valid


def make_batches(cfg: Config, data: PreprocessedDataset, train_ids, valid_ids, *, pad_multiple: int = 16,
                 output: str = "tuple") -> tuple[SegmentationBatches, SegmentationBatches]:
    """Augmented training crops and whole-image validation batches."""
    g = cfg.generator
    crop = tuple(g.crop_size) if g.crop_size else None
    common = dict(targets=g.targets, border_width=g.border_width, output=output, pad_multiple=pad_multiple)
    train = SegmentationBatches(
        data, train_ids, batch_size=g.batch_size, crop_size=crop, seed=g.seed, shuffle=True,
        augment=build_augmentation(cfg.augment.pipeline, crop_size=crop, seed=g.seed),
        workers=g.workers, use_multiprocessing=g.use_multiprocessing, max_queue_size=g.max_queue_size,
        steps_per_epoch=cfg.train.get("steps_per_epoch"), **common)
    valid = SegmentationBatches(data, valid_ids, batch_size=1, crop_size=None, shuffle=False, seed=g.seed, **common)
    return train, valid
