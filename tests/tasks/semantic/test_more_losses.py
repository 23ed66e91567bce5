"""Tversky / focal Tversky, the symmetric Lovasz hinge and loss combinations by weight: values against
NumPy written from the papers' formulas, their relations to the other losses, the weight map, and
the config that asks for them."""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pixel_losses import arrays, np_bce, np_dice, np_focal, np_lovasz, np_tversky, value  # noqa: E402

from kseg.core.config import load_config  # noqa: E402
from kseg.core.errors import ConfigError  # noqa: E402
from kseg.tasks.semantic import losses  # noqa: E402




@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"alpha": 0.7, "beta": 0.3}, {"gamma": 0.75}, {"smooth": 0.0}])
def test_tversky_matches_numpy(weighted, kwargs):
    y, p, w = arrays(21)
    w = w if weighted else None
    assert value(losses.tversky_loss(y, p, w, **kwargs)) == pytest.approx(np_tversky(y, p, w, **kwargs), rel=1e-5)


def test_tversky_with_equal_halves_is_dice():
    y, p, w = arrays(22)
    assert value(losses.tversky_loss(y, p, w, alpha=0.5, beta=0.5, smooth=0.5)) == pytest.approx(
        np_dice(y, p, w, smooth=1.0), rel=1e-5)


def test_tversky_by_hand():
    """One image, one channel: TP = 0.9 + 0.6, FP = 0.2, FN = 0.1 + 0.4; alpha 0.3, beta 0.7, no smoothing."""
    y = np.array([1, 1, 0, 0], np.float32).reshape(1, 2, 2, 1)
    p = np.array([0.9, 0.6, 0.2, 0.0], np.float32).reshape(1, 2, 2, 1)
    expected = 1 - 1.5 / (1.5 + 0.3 * 0.2 + 0.7 * 0.5)
    assert value(losses.tversky_loss(y, p, smooth=0.0)) == pytest.approx(expected, rel=1e-6)
    focal = value(losses.tversky_loss(y, p, smooth=0.0, gamma=0.75))
    assert focal == pytest.approx(expected ** 0.75, rel=1e-6) and focal > expected  # focal: small losses grow
    # A zero weight removes the pixel: dropping the half-missed 0.6 leaves TP 0.9, FN 0.1.
    w = np.array([1, 0, 1, 1], np.float32).reshape(1, 2, 2, 1)
    assert value(losses.tversky_loss(y, p, w, smooth=0.0)) == pytest.approx(1 - 0.9 / (0.9 + 0.3 * 0.2 + 0.7 * 0.1),
                                                                            rel=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("per_image", [True, False])
def test_symmetric_lovasz_is_the_mean_of_both_problems(weighted, per_image):
    y, p, w = arrays(23)
    w = w if weighted else None
    expected = 0.5 * (np_lovasz(y, p, w, per_image) + np_lovasz(1 - y, 1 - p, w, per_image))
    got = value(losses.lovasz_hinge(y, p, w, per_image=per_image, symmetric=True))
    assert got == pytest.approx(expected, rel=1e-5)
    assert got != pytest.approx(value(losses.lovasz_hinge(y, p, w, per_image=per_image)), rel=1e-3)




def test_combination_is_the_weighted_sum():
    y, p, w = arrays(24)
    weights = {"bce": 3, "dice": 1, "focal": 4}
    got = value(losses.combined_loss(y, p, w, weights=weights, args={"focal": {"gamma": 1.0}}))
    expected = 3 * np_bce(y, p, w) + np_dice(y, p, w) + 4 * np_focal(y, p, w, gamma=1.0)
    assert got == pytest.approx(expected, rel=1e-5)
    loss = losses.get_loss("combined", weights=weights, args={"focal": {"gamma": 1.0}})
    assert value(loss(y, p, sample_weight=w)) == pytest.approx(expected, rel=1e-5)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert restored.get_config() == loss.get_config()


@pytest.mark.parametrize("kwargs,message", [
    ({"weights": {"ce": 1}}, "cannot be combined"),
    ({"weights": {"bce": 0}}, "positive"),
    ({"weights": {"bce": 1}, "args": {"focal": {"gamma": 1}}}, "does not hold"),
    ({"weights": {"focal": 1}, "args": {"focal": {"gama": 1}}}, "gama"),
    ({}, "weights"),
])
def test_bad_combinations_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        losses.check_loss_args("combined", kwargs)


def test_the_config_takes_a_combination():
    from kseg.tasks.semantic.task import build_models

    cfg = load_config("demo", overrides=["train.loss={bce: 3, dice: 1}", "train.loss_args={dice: {smooth: 2.0}}",
                                         "model.args.depth=2", "model.args.base_filters=4"])
    _, training = build_models(cfg, 3)
    config = training.get_layer("pixel_loss").get_config()
    assert config["loss"] == "combined"
    assert config["loss_kwargs"] == {"weights": {"bce": 3, "dice": 1}, "args": {"dice": {"smooth": 2.0}}}
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((2, 16, 16, 3)).astype(np.float32),
             "target": (rng.random((2, 16, 16, 2)) > 0.5).astype(np.float32),
             "weight_map": rng.uniform(0.5, 2, (2, 16, 16)).astype(np.float32)}
    training.compile(optimizer="adam")
    assert np.isfinite(training.train_on_batch(batch))
    for bad, message in (("train.loss={bce: 3, ce: 1}", "cannot be combined"), ("train.loss={bce: -1}", "positive"),
                         ("train.loss=tverski", "tversky")):
        with pytest.raises(ConfigError, match=message):
            load_config("demo", overrides=[bad])
