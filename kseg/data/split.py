"""K-fold splits: a stratum per sample, and stratified round-robin fold assignment.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kseg.core.config import Config, project_path
from kseg.core.errors import ConfigError
from kseg.data.preprocess import PreprocessedDataset


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


def fold_strata(cfg: Config, data) -> list[str]:
    """The strata of a preprocessed dataset's samples, as every family splits them."""
    return strata(data, project_path(cfg.dataset.root))


def split_ids(cfg: Config, ids, groups: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(train ids, validation ids) of the configured fold (``split.n_folds``, ``fold``, ``seed``)."""
    return kfold_split(list(ids), cfg.split.n_folds, cfg.split.fold, cfg.split.seed, groups)
