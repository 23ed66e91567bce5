"""K-fold splits: partition properties, stratification, seeding, strata rules and the config entry."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from kseg.core.config import Config
from kseg.core.errors import ConfigError
from kseg.data.split import kfold_split, split_ids, strata

IDS = [f"id{i:03d}" for i in range(23)]


def all_folds(ids, n_folds, seed, groups=None):
    return [kfold_split(ids, n_folds, fold, seed, groups) for fold in range(n_folds)]


# --- partition properties -----------------------------------------------------------------------

@pytest.mark.parametrize("n_folds", [2, 3, 5, 23])
def test_validation_sets_partition_the_ids(n_folds):
    folds = all_folds(IDS, n_folds, seed=0)
    validations = [set(valid) for _, valid in folds]
    for a in range(n_folds):
        for b in range(a + 1, n_folds):
            assert not validations[a] & validations[b]
    every = [i for _, valid in folds for i in valid]
    assert sorted(every) == sorted(IDS)  # each id exactly once


@pytest.mark.parametrize("n_folds", [2, 3, 5])
def test_train_and_validation_are_complementary(n_folds):
    for train, valid in all_folds(IDS, n_folds, seed=1):
        assert not set(train) & set(valid)
        assert sorted(train + valid) == sorted(IDS)
        assert len(train) + len(valid) == len(IDS)
        # Both keep the input order.
        assert train == [i for i in IDS if i in set(train)]
        assert valid == [i for i in IDS if i in set(valid)]


@pytest.mark.parametrize("n_folds", [2, 3, 4, 5, 7])
def test_fold_sizes_differ_by_at_most_one(n_folds):
    sizes = [len(valid) for _, valid in all_folds(IDS, n_folds, seed=2)]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == len(IDS)


def test_fold_sizes_balanced_with_many_small_groups():
    ids = [f"s{i}" for i in range(17)]
    groups = ["a", "b", "c", "d", "e", "f", "g"] * 2 + ["h", "i", "j"]
    sizes = [len(valid) for _, valid in all_folds(ids, 4, seed=5, groups=groups)]
    assert sorted(sizes) == [4, 4, 4, 5]


def test_two_ids_two_folds():
    folds = all_folds(["x", "y"], 2, seed=0)
    assert sorted(valid[0] for _, valid in folds) == ["x", "y"]
    for train, valid in folds:
        assert len(train) == len(valid) == 1


# --- stratification ----------------------------------------------------------------------------

def test_stratified_counts_are_exact_when_groups_divide():
    ids = [f"s{i:02d}" for i in range(35)]
    groups = ["a"] * 10 + ["b"] * 5 + ["c"] * 20
    # Interleave so that groups are not contiguous in the input.
    order = np.random.default_rng(11).permutation(35)
    ids = [ids[k] for k in order]
    groups = [groups[k] for k in order]
    group_of = dict(zip(ids, groups))
    for seed in (0, 1, 2):
        for _, valid in all_folds(ids, 5, seed, groups):
            assert Counter(group_of[i] for i in valid) == Counter({"a": 2, "b": 1, "c": 4})


@pytest.mark.parametrize("seed", [0, 4, 9])
def test_stratified_counts_differ_by_at_most_one(seed):
    rng = np.random.default_rng(seed)
    ids = [f"s{i:02d}" for i in range(47)]
    groups = list(rng.choice(["a", "b", "c", "d"], size=47, p=[0.5, 0.3, 0.15, 0.05]))
    group_of = dict(zip(ids, groups))
    folds = all_folds(ids, 4, seed, groups)
    for group in set(groups):
        counts = [sum(group_of[i] == group for i in valid) for _, valid in folds]
        assert max(counts) - min(counts) <= 1, (group, counts)
        assert sum(counts) == groups.count(group)
    sizes = [len(valid) for _, valid in folds]
    assert max(sizes) - min(sizes) <= 1


def test_groups_none_is_one_group():
    assert all_folds(IDS, 4, seed=3) == all_folds(IDS, 4, seed=3, groups=["g"] * len(IDS))


# --- seeding ------------------------------------------------------------------------------------

def test_same_seed_same_split():
    assert all_folds(IDS, 5, seed=42) == all_folds(IDS, 5, seed=42)


def test_different_seed_different_split():
    assert all_folds(IDS, 5, seed=0) != all_folds(IDS, 5, seed=1)
    assert kfold_split(IDS, 5, 0, 0)[1] != kfold_split(IDS, 5, 0, 1)[1]


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fold", [-1, 5, 6])
def test_fold_out_of_range_raises(fold):
    with pytest.raises(ConfigError):
        kfold_split(IDS, 5, fold, 0)


@pytest.mark.parametrize("n_folds", [1, 0])
def test_too_few_folds_raises(n_folds):
    with pytest.raises(ConfigError):
        kfold_split(IDS, n_folds, 0, 0)


# --- strata -------------------------------------------------------------------------------------

class FakeData:
    """The part of a preprocessed dataset ``strata`` reads: ``ids`` and ``load``."""

    def __init__(self, targets: dict):
        self.targets = targets
        self.ids = list(targets)

    def load(self, sample_id):
        target = self.targets[sample_id]
        return {} if target is None else {"target": target}


def coverage_target(fraction: float, size: int = 20) -> np.ndarray:
    """A size x size mask whose first ``fraction * size**2`` pixels are foreground."""
    flat = np.zeros(size * size, np.uint8)
    flat[: int(round(fraction * size * size))] = 1
    return flat.reshape(size, size)


def test_strata_coverage_deciles():
    data = FakeData({
        "empty": coverage_target(0.0),
        "quarter": coverage_target(0.25),
        "tenth": coverage_target(0.10),
        "almost_tenth": coverage_target(0.0975),  # 39 / 400
        "half": coverage_target(0.5),
        "nine_tenths": coverage_target(0.9),
        "full": coverage_target(1.0),
        "missing": None,
    })
    assert strata(data) == ["0", "2", "1", "0", "5", "9", "9", "0"]


def test_strata_counts_nonzero_labels_as_foreground():
    target = np.zeros((10, 10), np.int32)
    target[0, :] = 1
    target[1, :] = 7
    target[2, :5] = 2  # 25 / 100 nonzero
    assert strata(FakeData({"a": target})) == ["2"]


def test_strata_reads_styles_when_every_id_has_one(tmp_path):
    data = FakeData({"a": coverage_target(0.0), "b": coverage_target(0.5), "c": coverage_target(1.0)})
    (tmp_path / "styles.json").write_text(json.dumps({"a": "fluo", "b": "tissue", "c": 3, "extra": "x"}))
    assert strata(data, tmp_path) == ["fluo", "tissue", "3"]


def test_strata_falls_back_to_coverage_when_a_style_is_missing(tmp_path):
    data = FakeData({"a": coverage_target(0.0), "b": coverage_target(0.5), "c": coverage_target(1.0)})
    (tmp_path / "styles.json").write_text(json.dumps({"a": "fluo", "b": "tissue"}))
    assert strata(data, tmp_path) == ["0", "5", "9"]


def test_strata_without_styles_file_uses_coverage(tmp_path):
    data = FakeData({"a": coverage_target(0.25)})
    assert strata(data, tmp_path) == ["2"]
    assert strata(data, None) == ["2"]


# --- split_ids ----------------------------------------------------------------------------------

def test_split_ids_follows_the_config():
    cfg = Config({"split": {"n_folds": 5, "fold": 1, "seed": 3}})
    groups = ["a", "b", "c"] * 7 + ["a", "b"]
    assert split_ids(cfg, IDS, None) == kfold_split(IDS, 5, 1, 3)
    assert split_ids(cfg, IDS, groups) == kfold_split(IDS, 5, 1, 3, groups)
    # Any iterable of ids is accepted.
    assert split_ids(cfg, tuple(IDS)) == kfold_split(IDS, 5, 1, 3)
    assert split_ids(cfg, IDS) != kfold_split(IDS, 5, 2, 3)


def test_split_ids_rejects_bad_fold():
    cfg = Config({"split": {"n_folds": 3, "fold": 3, "seed": 0}})
    with pytest.raises(ConfigError):
        split_ids(cfg, IDS)


# --- near-duplicate clusters -------------------------------------------------------------------

def round_robin_reference(ids, n_folds, fold, seed, groups=None):
    """The split before clusters existed, written out again: shuffle each group, deal round-robin."""
    groups = groups or ["all"] * len(ids)
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(ids), int)
    offset = 0
    for group in sorted(set(groups)):
        members = np.flatnonzero(np.asarray(groups) == group)
        members = members[rng.permutation(members.size)]
        assignment[members] = (np.arange(members.size) + offset) % n_folds
        offset += members.size
    return [i for i, f in zip(ids, assignment) if f != fold], [i for i, f in zip(ids, assignment) if f == fold]


@pytest.mark.parametrize("n_folds,seed", [(2, 0), (3, 7), (5, 42), (7, 1)])
def test_one_image_per_cluster_keeps_the_plain_split(n_folds, seed):
    groups = ["a", "b", "c"] * 7 + ["a", "b"]
    for fold in range(n_folds):
        expected = round_robin_reference(IDS, n_folds, fold, seed, groups)
        assert kfold_split(IDS, n_folds, fold, seed, groups) == expected
        assert kfold_split(IDS, n_folds, fold, seed, groups, clusters=list(range(len(IDS)))[::-1]) == expected


def test_a_cluster_stays_in_one_fold():
    clusters = list(range(len(IDS)))
    for members, label in (([0, 5, 9], 100), ([1, 2], 101), ([14, 22], 102)):
        for m in members:
            clusters[m] = label
    groups = ["a", "b"] * 11 + ["a"]
    for seed in range(5):
        folds = [kfold_split(IDS, 5, f, seed, groups, clusters) for f in range(5)]
        validations = [set(valid) for _, valid in folds]
        assert sorted(i for v in validations for i in v) == sorted(IDS)
        for members in ([0, 5, 9], [1, 2], [14, 22]):
            holding = [k for k, v in enumerate(validations) if IDS[members[0]] in v]
            assert all(IDS[m] in validations[holding[0]] for m in members)
        sizes = [len(v) for v in validations]
        assert max(sizes) - min(sizes) <= 3  # the largest cluster


def test_cluster_labels_must_match_the_ids():
    with pytest.raises(ValueError, match="cluster labels"):
        kfold_split(IDS, 5, 0, 0, None, clusters=[0, 1])


def test_split_ids_uses_clusters_only_when_configured(tmp_path):
    from kseg.data.split import fold_clusters

    rng = np.random.default_rng(0)
    big = np.zeros((400, 400), np.uint8)
    for y, x in rng.integers(10, 390, size=(90, 2)):
        big[max(y - 6, 0):y + 6, max(x - 8, 0):x + 8] = rng.integers(120, 255)
    images = {"left": big[:, :280], "right": big[:, 120:], "other": np.rot90(big).copy(), "fourth": big[::-1, ::-1][:, :200].copy()}

    class Images:
        ids = list(images)
        directory = tmp_path

        def load(self, sample_id):
            return {"image": images[sample_id][..., None]}

    off = Config({"split": {"n_folds": 2, "fold": 0, "seed": 0, "near_duplicates": False}})
    assert fold_clusters(off, Images()) is None
    on = Config({"split": {"n_folds": 2, "fold": 0, "seed": 0, "near_duplicates": True}})
    clusters = fold_clusters(on, Images())
    assert clusters[0] == clusters[1] and len(set(clusters)) == 3
    for fold in range(2):
        _, valid = split_ids(on, Images.ids, None, clusters)
        assert ("left" in valid) == ("right" in valid)
    with pytest.raises(ConfigError, match="near_duplicates"):
        fold_clusters(on, None)


def test_pseudo_labelled_ids_always_train_and_leave_the_real_folds_alone():
    cfg = Config({"split": {"n_folds": 5, "fold": 2, "seed": 3}})
    groups = ["a", "b", "c"] * 7 + ["a", "b"]
    ids = ["pseudo/x", *IDS[:10], "pseudo/y", *IDS[10:]]
    strata = ["pseudo", *groups[:10], "pseudo", *groups[10:]]
    train, valid = split_ids(cfg, ids, strata)
    real_train, real_valid = kfold_split(IDS, 5, 2, 3, groups)
    assert valid == real_valid
    assert train == real_train + ["pseudo/x", "pseudo/y"]
