"""From a resolved config to the labelled data: root -> reader -> preprocessing cache. Each step
is a plain function of the config, so a notebook can run the pipeline piece by piece.
"""

from __future__ import annotations

from pathlib import Path

from kseg.core.config import Config, project_path
from kseg.core.errors import ConfigError, DataError
from kseg.core.log import get_logger
from kseg.data.preprocess import PreprocessedDataset, PreprocessSettings, preprocess
from kseg.io.demo import write_demo_dataset
from kseg.io.pseudo import PseudoLabels, WithPseudoLabels
from kseg.io.readers import open_dataset


def data_root(cfg: Config) -> Path:
    """The dataset folder; the synthetic demo is generated there on first use."""
    if not cfg.dataset.root:
        raise ConfigError(f"dataset {cfg.dataset.name!r} has no root: pass DATA=path (or --data path)")
    root = project_path(cfg.dataset.root)
    if cfg.dataset.demo:
        if not root.is_dir() or not any(root.iterdir()):
            get_logger("data").info(f"writing the synthetic demo competition to {root}")
        write_demo_dataset(root, **dict(cfg.dataset.get("demo_args", {}) or {}))
    if not root.is_dir():
        raise DataError(f"dataset folder does not exist (dataset {cfg.dataset.name!r}; set DATA=path)", root)
    return root


def train_reader(cfg: Config):
    """The reader for the labelled part of the dataset, chosen by ``dataset.layout`` (with
    ``dataset.pseudo``, the pseudo-labelled images beside it, ids prefixed ``pseudo/``)."""

    root = data_root(cfg)
    section = cfg.dataset
    options = dict(section.options or {})
    train = root / section.train if section.train else root
    masks = root / section.masks if section.masks else None
    real = open_dataset(section.layout, train, masks=masks, intensity=cfg.preprocess.intensity,
                        modality=cfg.preprocess.get("modality", "keep"), **options)
    if not section.get("pseudo"):
        return real
    pseudo = PseudoLabels(project_path(section.pseudo), cfg.preprocess.intensity,
                          cfg.preprocess.get("modality", "keep"))
    return WithPseudoLabels(real, pseudo)


def preprocess_settings(cfg: Config) -> PreprocessSettings:
    return PreprocessSettings.from_config(cfg.preprocess)


def preprocess_train(cfg: Config) -> PreprocessedDataset:
    """Preprocess (or read from the cache) every labelled sample."""
    return preprocess(train_reader(cfg), preprocess_settings(cfg))
