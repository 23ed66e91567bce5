"""Per-sample seeding of augmentation pipelines: each transform takes its own random draw
(``augment.seeding: independent``), where albumentations' own seeding gives them all one."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest

from kseg.core.config import load_config
from kseg.core.errors import ConfigError
from kseg.data.augment import build_augmentation, compose

IMAGE = np.arange(16, dtype=np.uint8).reshape(4, 4)
OUTCOMES = {"none": IMAGE, "horizontal": IMAGE[:, ::-1], "vertical": IMAGE[::-1], "both": IMAGE[::-1, ::-1]}


def outcome_counts(pipeline, seeds=range(400)) -> dict[str, int]:
    counts = dict.fromkeys(OUTCOMES, 0)
    for seed in seeds:
        pipeline.set_random_seed(seed)
        out = pipeline(image=IMAGE)["image"]
        (name,) = [k for k, v in OUTCOMES.items() if np.array_equal(out, v)]
        counts[name] += 1
    return counts


def flips(seeding):
    return compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)], seeding=seeding)


def test_independent_seeding_gives_every_flip_combination_its_share():
    counts = outcome_counts(flips("independent"))
    # 400 draws of four outcomes of probability 1/4: each within 100 +- 30 (over 3.4 standard deviations).
    assert all(70 <= n <= 130 for n in counts.values()), counts


def test_shared_seeding_is_albumentations_own():
    shared, plain = flips("shared"), A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    assert type(shared) is A.Compose
    for seed in range(50):
        shared.set_random_seed(seed)
        plain.set_random_seed(seed)
        np.testing.assert_array_equal(shared(image=IMAGE)["image"], plain(image=IMAGE)["image"])


def test_nested_transforms_get_their_own_seeds_and_a_seed_repeats_its_output():
    pipeline = compose([A.OneOf([A.HorizontalFlip(p=1.0), A.VerticalFlip(p=1.0)], p=1.0),
                        A.OneOf([A.Transpose(p=1.0), A.NoOp(p=1.0)], p=1.0)], seeding="independent")
    pipeline.set_random_seed(3)
    seeds = [t.seed for t in (pipeline.transforms[0], *pipeline.transforms[0].transforms,
                              pipeline.transforms[1], *pipeline.transforms[1].transforms)]
    assert len(set(seeds)) == len(seeds)
    image = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    first = pipeline(image=image)["image"]
    pipeline.set_random_seed(3)
    np.testing.assert_array_equal(pipeline(image=image)["image"], first)


def test_the_microscopy_preset_no_longer_switches_all_its_transforms_together():
    preset = build_augmentation("microscopy", seed=0)
    untouched = 0
    image = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    for seed in range(200):
        preset.set_random_seed(seed)
        untouched += np.array_equal(preset(image=image)["image"], image)
    # Eight transforms, none applied: (0.5^5 x 0.85 x 0.7 x 0.7) ~ 1.3% of samples when independent;
    # with one shared draw every transform is off whenever the draw is above 0.5, half the samples.
    assert untouched <= 10


def test_the_config_key():
    assert load_config("demo").augment.seeding == "independent"
    with pytest.raises(ConfigError, match="seeding"):
        load_config("demo", overrides=["augment.seeding=together"])
    with pytest.raises(ConfigError, match="augment.seeding must be one of independent, shared"):
        compose([], seeding="together")
