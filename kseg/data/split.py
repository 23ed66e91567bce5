"""K-fold splits: a stratum per sample, and stratified round-robin fold assignment, optionally
keeping clusters of near-duplicate images in one fold (``split.near_duplicates``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kseg.core.config import Config, project_path
from kseg.core.errors import ConfigError
from kseg.data.duplicates import near_duplicate_clusters
from kseg.data.preprocess import PreprocessedDataset
from kseg.io.pseudo import is_pseudo


def strata(data: PreprocessedDataset, root: Path | None = None) -> list[str]:
    """A stratum per sample for k-fold splits: the image style when the dataset records it
    (the demo does), else the mask-coverage decile (the TGS Salt recipe)."""
    styles = {}
    if root is not None and (root / "styles.json").is_file():
        styles = json.loads((root / "styles.json").read_text())
    real = [i for i in data.ids if not is_pseudo(i)]
    if styles and all(i in styles for i in real):
        return [str(styles[i]) if i in styles else "pseudo" for i in data.ids]
    coverage = []
    for sample_id in data.ids:
        target = data.load(sample_id).get("target")
        coverage.append(0.0 if target is None else float((target > 0).mean()))
    return [str(int(min(c, 0.999) * 10)) for c in coverage]


def kfold_split(ids: list[str], n_folds: int, fold: int, seed: int, groups: list[str] | None = None,
                clusters: list[int] | None = None):
    """(train ids, validation ids) of ``fold``: stratified round-robin within each group (stratum).

    With ``clusters`` (a label per id) each cluster goes to one fold whole, as one unit of its
    first member's stratum, to the fold holding the fewest images (ties: the next fold in
    round-robin order). With one id per cluster that is exactly the plain round-robin split, so
    a dataset without near duplicates keeps its folds."""
    if not 0 <= fold < n_folds:
        raise ConfigError(f"split.fold={fold} is outside 0..{n_folds - 1}")
    if n_folds < 2:
        raise ConfigError(f"split.n_folds must be at least 2, not {n_folds}")
    groups = groups or ["all"] * len(ids)
    clusters = list(range(len(ids))) if clusters is None else list(clusters)
    if len(clusters) != len(ids):
        raise ValueError(f"{len(clusters)} cluster labels for {len(ids)} ids")
    members_of: dict[int, list[int]] = {}
    for index, cluster in enumerate(clusters):
        members_of.setdefault(cluster, []).append(index)
    units = list(members_of.values())
    unit_groups = np.array([groups[unit[0]] for unit in units])
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(ids), int)
    counts = np.zeros(n_folds, int)
    assigned = 0  # images placed so far: the round-robin pointer, balanced across small groups
    for group in sorted(set(groups)):
        chosen = np.flatnonzero(unit_groups == group)
        for unit in chosen[rng.permutation(chosen.size)]:
            members = units[unit]
            target = min(range(n_folds), key=lambda f: (counts[f], (f - assigned) % n_folds))
            assignment[members] = target
            counts[target] += len(members)
            assigned += len(members)
    train = [i for i, f in zip(ids, assignment) if f != fold]
    valid = [i for i, f in zip(ids, assignment) if f == fold]
    return train, valid


def fold_strata(cfg: Config, data) -> list[str]:
    """The strata of a preprocessed dataset's samples, as every family splits them."""
    return strata(data, project_path(cfg.dataset.root))


def fold_clusters(cfg: Config, data: PreprocessedDataset | None) -> list[int] | None:
    """A near-duplicate cluster per sample of ``data`` when ``split.near_duplicates`` is on
    (:mod:`kseg.data.duplicates`, kept in the cache folder), else None."""
    if not cfg.split.get("near_duplicates", False):
        return None
    if data is None:
        raise ConfigError("split.near_duplicates needs the preprocessed images; this model family has none")
    return near_duplicate_clusters(data.ids, lambda i: data.load(i)["image"], data.directory)


def split_ids(cfg: Config, ids, groups: list[str] | None = None,
              clusters: list[int] | None = None) -> tuple[list[str], list[str]]:
    """(train ids, validation ids) of the configured fold (``split.n_folds``, ``fold``, ``seed``).
    Pseudo-labelled ids (``kseg.io.pseudo``) always train and never validate; the real ids are
    split exactly as they would be without them."""
    ids = list(ids)
    real = [k for k, i in enumerate(ids) if not is_pseudo(i)]
    pick = (lambda values: None if values is None else [values[k] for k in real])
    train, valid = kfold_split([ids[k] for k in real], cfg.split.n_folds, cfg.split.fold, cfg.split.seed,
                               pick(groups), pick(clusters))
    return train + [i for i in ids if is_pseudo(i)], valid


def dataset_split(cfg: Config, data: PreprocessedDataset) -> tuple[list[str], list[str]]:
    """(train ids, validation ids) of a preprocessed dataset, as training splits it."""
    return split_ids(cfg, data.ids, fold_strata(cfg, data), fold_clusters(cfg, data))
