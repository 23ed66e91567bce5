"""The training fingerprint decides whether an unfinished run (or CV folder) resumes: every training
setting changes it, a key added later at the value that reproduces older runs does not."""

from __future__ import annotations

import pytest

from kseg.core.config import Config, apply_overrides, load_config
from kseg.core.runs import NEUTRAL_DEFAULTS, training_fingerprint


def without(settings: dict, section: str, key: str) -> dict:
    return {**settings, section: {k: v for k, v in settings[section].items() if k != key}}


def test_a_later_key_at_its_neutral_value_keeps_older_fingerprints():
    settings = load_config("dsb2018").to_dict()
    for (section, key), value in NEUTRAL_DEFAULTS.items():
        assert settings[section][key] == value, "the shipped default is the neutral value"
        older = Config(without(settings, section, key))  # a run's config.yaml from before the key
        assert training_fingerprint(Config(settings)) == training_fingerprint(older)


@pytest.mark.parametrize("override", ["split.near_duplicates=true", "split.fold=1", "train.epochs=41",
                                      "preprocess.modality=fluorescence"])
def test_a_training_setting_changes_the_fingerprint(override):
    settings = load_config("dsb2018").to_dict()
    assert training_fingerprint(Config(apply_overrides(settings, [override]))) != training_fingerprint(Config(settings))
