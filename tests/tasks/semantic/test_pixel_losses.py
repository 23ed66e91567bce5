"""kseg.tasks.semantic.losses and .keras_metrics against independent NumPy references on tiny arrays."""

from __future__ import annotations

import importlib.util
import textwrap

import keras
import numpy as np
import pytest
from backends import run_on_jax

from kseg.core.errors import ConfigError
from kseg.tasks.semantic import losses
from kseg.tasks.semantic.keras_metrics import MaskDice, MaskIoU

EPS = 1e-7
TOL = dict(rtol=1e-5, atol=1e-6)
SIGMOID_LOSSES = ["bce", "dice", "bce_dice", "focal", "lovasz", "tversky"]


# -- NumPy references (float64, written from the papers' formulas) -----------------------------------
def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_bce_elements(y, p):
    p = np.clip(p, EPS, 1 - EPS)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def weights_like(w, shape):
    return np.ones(shape) if w is None else np.broadcast_to(w, shape)


def np_bce(y, p, w=None):
    y, p = np.float64(y), np.float64(p)
    return float(np.mean(weights_like(w, p.shape) * np_bce_elements(y, p)))


def np_ce(labels, probs, w=None):
    labels = labels.reshape(probs.shape[:-1]).astype(int)
    picked = np.take_along_axis(np.float64(probs), labels[..., None], axis=-1)[..., 0]
    loss = -np.log(np.clip(picked, EPS, 1.0))
    return float(np.mean(weights_like(None if w is None else w.reshape(loss.shape), loss.shape) * loss))


def np_dice(y, p, w=None, smooth=1.0):
    y, p = np.float64(y), np.float64(p)
    w = weights_like(w, p.shape)
    scores = []
    for b in range(p.shape[0]):
        for c in range(p.shape[-1]):
            yy, pp, ww = y[b, ..., c], p[b, ..., c], w[b, ..., c]
            scores.append((2 * (ww * yy * pp).sum() + smooth) / ((ww * yy).sum() + (ww * pp).sum() + smooth))
    return 1.0 - float(np.mean(scores))


def np_focal(y, p, w=None, alpha=0.25, gamma=2.0):
    y, p = np.float64(y), np.clip(np.float64(p), EPS, 1 - EPS)
    loss = np.where(y == 1, -alpha * (1 - p) ** gamma * np.log(p), -(1 - alpha) * p ** gamma * np.log(1 - p))
    return float(np.mean(weights_like(w, p.shape) * loss))


def np_lovasz_errors(errors, labels):
    """Berman et al.'s lovasz_hinge_flat from hinge errors: sort, Jaccard differences, dot."""
    if labels.size == 0:
        return 0.0
    order = np.argsort(-errors, kind="stable")
    errors, gt = errors[order], labels[order]
    gts = gt.sum()
    jaccard = 1.0 - (gts - np.cumsum(gt)) / (gts + np.cumsum(1 - gt))
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return float(np.dot(np.maximum(errors, 0), jaccard))


def np_lovasz_flat(logits, labels):
    return np_lovasz_errors(1.0 - logits * (2.0 * labels - 1.0), labels)


def np_lovasz(y, p, w=None, per_image=True):
    """Per image and channel; a weight scales the pixel's hinge error, a zero weight drops the pixel."""
    p = np.clip(np.float64(p), EPS, 1 - EPS)
    logits = np.log(p) - np.log(1 - p)
    y = np.float64(y)
    w = weights_like(w, p.shape)
    values = []
    for c in range(p.shape[-1]):
        for b in (range(p.shape[0]) if per_image else [slice(None)]):
            x, t, ww = logits[b, ..., c].ravel(), y[b, ..., c].ravel(), w[b, ..., c].ravel()
            keep = ww > 0
            values.append(np_lovasz_errors(ww[keep] * (1.0 - x[keep] * (2 * t[keep] - 1)), t[keep]))
    return float(np.mean(values))


def np_tversky(y, p, w=None, alpha=0.3, beta=0.7, gamma=1.0, smooth=1.0):
    """Salehi et al. 2017 per image and channel, weighted soft counts; (1 - T)^gamma averaged."""
    y, p = np.float64(y), np.float64(p)
    w = np.ones(p.shape) if w is None else np.broadcast_to(w, p.shape)
    values = []
    for b in range(p.shape[0]):
        for c in range(p.shape[-1]):
            yy, pp, ww = y[b, ..., c], p[b, ..., c], w[b, ..., c]
            tp, fp, fn = (ww * yy * pp).sum(), (ww * (1 - yy) * pp).sum(), (ww * yy * (1 - pp)).sum()
            values.append((1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)) ** gamma)
    return float(np.mean(values))


REFERENCES = {"bce": np_bce, "dice": np_dice, "focal": np_focal, "lovasz": np_lovasz, "tversky": np_tversky,
              "bce_dice": lambda y, p, w=None: np_bce(y, p, w) + np_dice(y, p, w)}


def arrays(seed=0, shape=(2, 5, 6, 2)):
    rng = np.random.default_rng(seed)
    y = (rng.random(shape) > 0.5).astype(np.float32)
    p = rng.uniform(0.02, 0.98, shape).astype(np.float32)
    w = rng.uniform(0.0, 3.0, shape[:-1] + (1,)).astype(np.float32)
    return y, p, w


def value(x) -> float:
    return float(keras.ops.convert_to_numpy(x))


# -- values against the references ----------------------------------------------------------------
@pytest.mark.parametrize("name", SIGMOID_LOSSES)
@pytest.mark.parametrize("weighted", [False, True])
def test_sigmoid_losses_match_numpy(name, weighted):
    y, p, w = arrays()
    w = w if weighted else None
    got = value(losses.loss_function(name)(y, p, weight_map=w))
    np.testing.assert_allclose(got, REFERENCES[name](y, p, w), **TOL)


@pytest.mark.parametrize("name", SIGMOID_LOSSES)
def test_from_logits_equals_probabilities(name):
    rng = np.random.default_rng(1)
    y, _, w = arrays(1)
    logits = rng.normal(0, 2, y.shape).astype(np.float32)
    fn = losses.loss_function(name)
    np.testing.assert_allclose(value(fn(y, logits, w, from_logits=True)),
                               value(fn(y, np_sigmoid(logits).astype(np.float32), w)), rtol=2e-5, atol=1e-6)


def test_lovasz_matches_berman_reference_unweighted():
    """Checks the flat routine itself against Berman's formula (independent of the weight handling)."""
    y, p, _ = arrays(2, shape=(3, 4, 4, 1))
    logits = np.log(np.float64(p)) - np.log(1 - np.float64(p))
    expected = np.mean([np_lovasz_flat(logits[b].ravel(), np.float64(y[b]).ravel()) for b in range(3)])
    np.testing.assert_allclose(value(losses.lovasz_hinge(y, p)), expected, **TOL)
    whole = np_lovasz_flat(logits.ravel(), np.float64(y).ravel())
    np.testing.assert_allclose(value(losses.lovasz_hinge(y, p, per_image=False)), whole, **TOL)


@pytest.mark.parametrize("weighted", [False, True])
def test_weighted_ce_matches_numpy(weighted):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, (2, 5, 6))
    probs = rng.dirichlet(np.ones(4), (2, 5, 6)).astype(np.float32)
    w = rng.uniform(0, 2, (2, 5, 6, 1)).astype(np.float32) if weighted else None
    expected = np_ce(labels, probs, w)
    np.testing.assert_allclose(value(losses.weighted_ce(labels, probs, w)), expected, **TOL)
    np.testing.assert_allclose(value(losses.weighted_ce(labels[..., None], probs, w)), expected, **TOL)
    logits = np.log(probs) + 0.7  # any shift: softmax(log p + c) == p
    np.testing.assert_allclose(value(losses.weighted_ce(labels, logits, w, from_logits=True)), expected, rtol=2e-5)


def test_focal_with_gamma_zero_and_no_alpha_is_bce():
    y, p, w = arrays(4)
    np.testing.assert_allclose(value(losses.focal_loss(y, p, w, alpha=None, gamma=0.0)), np_bce(y, p, w), **TOL)


# -- edge cases --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SIGMOID_LOSSES)
@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_constant_targets_match_numpy(name, fill):
    _, p, w = arrays(5)
    y = np.full(p.shape, fill, np.float32)
    got = value(losses.loss_function(name)(y, p, w))
    assert np.isfinite(got)
    np.testing.assert_allclose(got, REFERENCES[name](y, p, w), **TOL)


def test_dice_of_empty_image_predicted_empty_is_zero():
    empty = np.zeros((2, 4, 4, 1), np.float32)
    assert value(losses.soft_dice(empty, empty)) == 0.0
    assert value(losses.soft_dice(np.ones_like(empty), np.ones_like(empty))) == pytest.approx(0.0, abs=1e-7)
    # smooth=1: one false-positive pixel of probability 1 in an empty image halves the score
    one = empty.copy()
    one[0, 0, 0, 0] = 1
    assert value(losses.soft_dice(empty[:1], one[:1])) == pytest.approx(0.5)


def test_all_zero_weight_map_gives_zero_pixel_losses():
    y, p, w = arrays(6)
    zero = np.zeros_like(w)
    for name in ["bce", "focal", "lovasz"]:
        assert value(losses.loss_function(name)(y, p, zero)) == 0.0


def test_saturated_probabilities_stay_finite():
    y = np.array([1, 0, 1, 0], np.float32).reshape(1, 2, 2, 1)
    p = np.array([0, 1, 1, 0], np.float32).reshape(1, 2, 2, 1)
    for name in SIGMOID_LOSSES:
        assert np.isfinite(value(losses.loss_function(name)(y, p))), name


def test_float16_predictions_are_computed_in_float32():
    y, p, w = arrays(7)
    out = losses.weighted_bce(y, p.astype(np.float16), w)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_allclose(value(out), np_bce(y, p.astype(np.float16), w), rtol=1e-5)


# -- normalisation: mean over pixels of w * l ---------------------------------------------------------
def test_weight_normalisation_is_pixel_mean():
    y, p, w = arrays(8)
    plain = value(losses.weighted_bce(y, p))
    assert value(losses.weighted_bce(y, p, np.ones_like(w))) == pytest.approx(plain, rel=1e-6)
    assert value(losses.weighted_bce(y, p, 2 * w)) == pytest.approx(2 * value(losses.weighted_bce(y, p, w)), rel=1e-6)
    # (B, H, W), (B, H, W, 1) and per-channel (B, H, W, C) maps agree
    shared = value(losses.weighted_bce(y, p, w))
    assert value(losses.weighted_bce(y, p, w[..., 0])) == pytest.approx(shared, rel=1e-6)
    assert value(losses.weighted_bce(y, p, np.repeat(w, 2, axis=-1))) == pytest.approx(shared, rel=1e-6)


@pytest.mark.parametrize("name", ["bce", "ce", "dice", "bce_dice", "focal", "lovasz"])
def test_zero_weight_removes_the_pixels_gradient(name):
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        pytest.skip("gradient check uses tf.GradientTape")
    rng = np.random.default_rng(9)
    if name == "ce":
        y = rng.integers(0, 3, (2, 4, 5)).astype(np.float32)
        p = rng.dirichlet(np.ones(3), (2, 4, 5)).astype(np.float32)
    else:
        y, _, _ = arrays(9, shape=(2, 4, 5, 2))
        p = rng.uniform(0.3, 0.7, y.shape).astype(np.float32)  # |logit| < 1: every hinge error > 0
    w = rng.uniform(0.5, 2.0, (2, 4, 5, 1)).astype(np.float32)
    fn = losses.loss_function(name)

    def grad(weights):
        pred = tf.Variable(p)
        with tf.GradientTape() as tape:
            loss = fn(y, pred, weights)
        return np.abs(tape.gradient(loss, pred).numpy()).sum(axis=-1)  # per pixel

    pixel = (1, 2, 3)
    assert grad(w)[pixel] > 0
    w_zero = w.copy()
    w_zero[pixel] = 0.0
    g = grad(w_zero)
    assert g[pixel] == 0.0
    others = np.delete(g.ravel(), np.ravel_multi_index(pixel, g.shape))
    if name == "lovasz":  # background pixels sorted after every foreground one have zero gradient
        assert (others > 0).sum() >= others.size // 2
    else:
        assert (others > 0).all()


# -- Loss classes, registry, serialisation ---------------------------------------------------------
@pytest.mark.parametrize("name", ["bce", "dice", "bce_dice", "focal", "lovasz", "tversky"])
def test_loss_class_equals_function(name):
    y, p, w = arrays(10)
    loss, fn = losses.get_loss(name), losses.loss_function(name)
    assert value(loss(y, p)) == pytest.approx(value(fn(y, p)), rel=1e-6)
    assert value(loss(y, p, sample_weight=w)) == pytest.approx(value(fn(y, p, w)), rel=1e-6)
    assert value(loss(y, p, sample_weight=w[..., 0])) == pytest.approx(value(fn(y, p, w)), rel=1e-6)
    # a rank-1 sample_weight weights images, as in Keras: sum_b s_b l_b / B
    per_image = [value(fn(y[b:b + 1], p[b:b + 1])) for b in range(2)]
    assert value(loss(y, p, sample_weight=np.array([1.0, 0.0], np.float32))) == pytest.approx(per_image[0] / 2,
                                                                                            rel=1e-6)


@pytest.mark.parametrize("name,kwargs", [("bce", {"from_logits": True}), ("ce", {}), ("dice", {"smooth": 2.0}),
                                         ("bce_dice", {"bce_weight": 0.5, "dice_weight": 2.0}),
                                         ("focal", {"alpha": None, "gamma": 1.5}), ("lovasz", {"per_image": False})])
def test_loss_classes_serialise(name, kwargs):
    loss = losses.get_loss(name, **kwargs)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()
    for key, val in kwargs.items():
        assert restored.get_config()[key] == val


def test_registry_errors_say_what_exists():
    assert set(losses.LOSS_NAMES) == {"bce", "ce", "dice", "bce_dice", "focal", "lovasz", "tversky"}
    with pytest.raises(ConfigError, match="bce_dice"):
        losses.get_loss("dicee")
    with pytest.raises(ConfigError, match="gama"):
        losses.get_loss("focal", gama=2)
    with pytest.raises(ConfigError, match="smooth"):
        losses.check_loss_args("dice", {"smoth": 1})
    losses.check_loss_args("bce_dice", {"bce_weight": 0.5, "smooth": 1.0})


def test_compile_with_pixel_sample_weight():
    """compile(loss=WeightedBCE()) + fit(..., sample_weight=weight_map) reports the function's value."""
    inputs = keras.Input((4, 4, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=losses.WeightedBCE(), run_eagerly=True)
    y, _, w = arrays(11, shape=(2, 4, 4, 1))
    x = np.random.default_rng(11).random((2, 4, 4, 1)).astype(np.float32)
    reported = model.evaluate(x, y, sample_weight=w, batch_size=2, verbose=0)
    assert reported == pytest.approx(np_bce(y, model.predict(x, verbose=0), w), rel=1e-5)


# -- Keras metrics ---------------------------------------------------------------------------------
def test_mask_metrics_accumulate_over_batches():
    t1 = np.array([[1, 1, 0], [0, 0, 0]], np.float32).reshape(1, 2, 3, 1)
    p1 = np.array([[0.9, 0.2, 0.7], [0.1, 0.1, 0.1]], np.float32).reshape(1, 2, 3, 1)
    t2 = np.array([[1, 1, 1], [1, 0, 0]], np.float32).reshape(1, 2, 3, 1)
    p2 = np.array([[0.6, 0.6, 0.6], [0.6, 0.6, 0.4]], np.float32).reshape(1, 2, 3, 1)
    # batch 1: I=1, T=2, P=2; batch 2: I=4, T=4, P=5 -> I=5, T=6, P=7
    iou, dice = MaskIoU(), MaskDice()
    for metric in (iou, dice):
        metric.update_state(t1, p1)
        metric.update_state(t2, p2)
    assert value(iou.result()) == pytest.approx(5 / (6 + 7 - 5))
    assert value(dice.result()) == pytest.approx(2 * 5 / (6 + 7))
    # not the mean of batch IoUs (1/3 and 4/5)
    assert value(iou.result()) != pytest.approx((1 / 3 + 4 / 5) / 2)
    iou.reset_state()
    iou.update_state(t1, p1)
    assert value(iou.result()) == pytest.approx(1 / 3)


def test_mask_metrics_channel_threshold_weights_and_empty():
    rng = np.random.default_rng(12)
    t = (rng.random((2, 4, 4, 2)) > 0.5).astype(np.float32)
    p = rng.random((2, 4, 4, 2)).astype(np.float32)
    w = rng.random((2, 4, 4, 1)).astype(np.float32)
    metric = MaskIoU(threshold=0.3, channel=1)
    metric.update_state(t, p, sample_weight=w)
    tt, pp, ww = t[..., 1] > 0.5, p[..., 1] > 0.3, w[..., 0]
    assert value(metric.result()) == pytest.approx((ww * (tt & pp)).sum() / (ww * (tt | pp)).sum(), rel=1e-5)
    empty = MaskIoU()
    empty.update_state(np.zeros((1, 2, 2)), np.zeros((1, 2, 2, 1)))
    assert value(empty.result()) == 1.0
    assert value(MaskDice().result()) == 1.0
    restored = MaskDice.from_config(MaskDice(threshold=0.4, channel=1, name="d").get_config())
    assert (restored.threshold, restored.channel, restored.name) == (0.4, 1, "d")
    with pytest.raises(ValueError, match="y=target"):
        MaskIoU().update_state(None, p)


# -- JAX backend ------------------------------------------------------------------------------------
@pytest.mark.jax
@pytest.mark.slow
def test_losses_and_metrics_agree_on_jax():
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    y, p, w = arrays(13)
    expected = {name: value(losses.loss_function(name)(y, p, w)) for name in SIGMOID_LOSSES}
    code = textwrap.dedent(
        f"""
        import numpy as np, keras
        from kseg.tasks.semantic import losses
        from kseg.tasks.semantic.keras_metrics import MaskIoU
        assert keras.backend.backend() == "jax"
        rng = np.random.default_rng(13)
        shape = (2, 5, 6, 2)
        y = (rng.random(shape) > 0.5).astype(np.float32)
        p = rng.uniform(0.02, 0.98, shape).astype(np.float32)
        w = rng.uniform(0.0, 3.0, shape[:-1] + (1,)).astype(np.float32)
        expected = {expected!r}
        for name, want in expected.items():
            got = float(losses.loss_function(name)(y, p, w))
            assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (name, got, want)
            assert abs(float(losses.get_loss(name)(y, p, sample_weight=w)) - want) <= 1e-5 * max(1.0, abs(want))
        m = MaskIoU()
        m.update_state(y, p); m.reset_state(); m.update_state(y, p)
        assert 0 < float(m.result()) < 1
        print("ok")
        """
    )
    run_on_jax(code)
