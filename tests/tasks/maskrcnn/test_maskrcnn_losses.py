"""kseg.tasks.maskrcnn.losses (RPN objectness / boxes, box head class / boxes, mask head) against
NumPy references written item by item in float64, with hand-computed values, the ignore / padding /
other-class rules checked on values and gradients, in a ``tf.function`` and under ``jax.jit``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from backends import run_on_jax

from kseg.core.errors import ConfigError
from kseg.tasks.maskrcnn import losses

TOL = dict(rtol=2e-5, atol=1e-6)
SEEDS = [0, 1, 2, 3, 4]


# -- NumPy references ------------------------------------------------------------------------------
def np_bce_logit(x, y):
    p = 1.0 / (1.0 + math.exp(-float(x)))
    return -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


def np_smooth_l1_sum(d):
    a = np.abs(np.float64(d))
    return float(np.where(a < 1.0, 0.5 * a * a, a - 0.5).sum())


def np_rpn_class(labels, logits):
    logits = logits.reshape(labels.shape)
    values = [np_bce_logit(logits[b, a], float(labels[b, a] == 1))
              for b in range(labels.shape[0]) for a in range(labels.shape[1]) if labels[b, a] != -1]
    return sum(values) / max(len(values), 1)


def np_rpn_box(labels, target, pred):
    values = [np_smooth_l1_sum(pred[b, a] - target[b, a])
              for b in range(labels.shape[0]) for a in range(labels.shape[1]) if labels[b, a] == 1]
    return sum(values) / max(len(values), 1)


def np_head_class(class_ids, logits, valid):
    values = []
    for b in range(class_ids.shape[0]):
        for n in range(class_ids.shape[1]):
            if valid[b, n] == 1:
                x = np.float64(logits[b, n])
                log_z = x.max() + math.log(np.exp(x - x.max()).sum())
                values.append(log_z - x[class_ids[b, n]])
    return sum(values) / max(len(values), 1)


def np_head_box(class_ids, target, deltas):
    values = [np_smooth_l1_sum(deltas[b, n, class_ids[b, n]] - target[b, n])
              for b in range(class_ids.shape[0]) for n in range(class_ids.shape[1]) if class_ids[b, n] > 0]
    return sum(values) / max(len(values), 1)


def np_mask(class_ids, masks, outputs, from_logits=True):
    total, pixels = 0.0, 0
    for b in range(class_ids.shape[0]):
        for n in range(class_ids.shape[1]):
            c = class_ids[b, n]
            if c <= 0:
                continue
            y = np.float64(masks[b, n])
            if from_logits:
                p = 1.0 / (1.0 + np.exp(-np.float64(outputs[b, n, :, :, c])))
            else:
                p = np.clip(np.float64(outputs[b, n, :, :, c]), 1e-7, 1 - 1e-7)
            total += float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).sum())
            pixels += y.size
    return total / max(pixels, 1)


# -- random inputs ---------------------------------------------------------------------------------
def rpn_batch(seed, batch=3, anchors=40):
    rng = np.random.default_rng(seed)
    labels = rng.choice([-1, 0, 1], size=(batch, anchors), p=[0.5, 0.35, 0.15]).astype(np.int32)
    labels[0, :2] = 1
    labels[-1] = np.where(labels[-1] == 1, 0, labels[-1])  # an image without positives
    logits = rng.normal(0.0, 3.0, (batch, anchors, 1)).astype(np.float32)
    target = rng.normal(0.0, 1.0, (batch, anchors, 4)).astype(np.float32)
    pred = (target + rng.normal(0.0, 1.5, target.shape)).astype(np.float32)
    return labels, logits, target, pred


def head_batch(seed, batch=3, rois=10, n_classes=4, mask_size=(6, 5)):
    rng = np.random.default_rng(seed)
    class_ids = np.where(rng.random((batch, rois)) < 0.4, rng.integers(1, n_classes, (batch, rois)), 0)
    valid = np.ones((batch, rois), np.float32)
    valid[0, -3:] = 0.0  # padding rows: class 0, like background
    valid[1, -1:] = 0.0
    class_ids = np.where(valid > 0, class_ids, 0).astype(np.int32)
    class_ids[0, 0] = 1
    class_ids[-1] = 0  # an image with only background RoIs
    logits = rng.normal(0.0, 2.0, (batch, rois, n_classes)).astype(np.float32)
    target = rng.normal(0.0, 1.0, (batch, rois, 4)).astype(np.float32)
    deltas = rng.normal(0.0, 1.5, (batch, rois, n_classes, 4)).astype(np.float32)
    masks = (rng.random((batch, rois) + mask_size) < 0.4).astype(np.float32)
    mask_logits = rng.normal(0.0, 2.0, (batch, rois) + mask_size + (n_classes,)).astype(np.float32)
    return class_ids, valid, logits, target, deltas, masks, mask_logits


def scalar(x):
    assert x.dtype == "float32" and tuple(x.shape) == ()
    return float(x)


def gradient(fn, x):
    variable = tf.Variable(x)
    with tf.GradientTape() as tape:
        loss = fn(variable)
    grad = tape.gradient(loss, variable).numpy()
    assert np.all(np.isfinite(grad))
    return grad


# -- RPN -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_rpn_losses_match_reference(seed):
    labels, logits, target, pred = rpn_batch(seed)
    want = np_rpn_class(labels, logits)
    np.testing.assert_allclose(scalar(losses.rpn_class_loss(labels, logits)), want, **TOL)
    np.testing.assert_allclose(scalar(losses.rpn_class_loss(labels, logits[..., 0])), want, **TOL)
    np.testing.assert_allclose(scalar(losses.rpn_box_loss(labels, target, pred)),
                               np_rpn_box(labels, target, pred), **TOL)


def test_rpn_hand_computed():
    labels = np.array([[1, 0, -1, 0]], np.int32)
    logits = np.array([[0.0, math.log(3.0), 100.0, -100.0]], np.float32)
    # log 2 (p = 1/2 for an object) + log 4 (p = 3/4 for background) + 0, over 3 sampled anchors
    np.testing.assert_allclose(float(losses.rpn_class_loss(labels, logits)), math.log(8.0) / 3, rtol=1e-6)
    target = np.zeros((1, 4, 4), np.float32)
    pred = np.array([[[0.5, -2.0, 0.0, 0.0]] + [[9.0] * 4] * 3], np.float32)
    np.testing.assert_allclose(float(losses.rpn_box_loss(labels, target, pred)), 0.125 + 1.5, rtol=1e-6)


def test_rpn_ignored_and_negative_anchors_do_not_count():
    labels, logits, target, pred = rpn_batch(7)
    base_class = float(losses.rpn_class_loss(labels, logits))
    base_box = float(losses.rpn_box_loss(labels, target, pred))
    changed_logits = np.where((labels == -1)[..., None], np.nan, logits).astype(np.float32)
    assert float(losses.rpn_class_loss(labels, changed_logits)) == base_class
    off = (labels != 1)[..., None]
    assert float(losses.rpn_box_loss(labels, np.where(off, np.nan, target), np.where(off, 1e30, pred))) == base_box

    grad = gradient(lambda x: losses.rpn_class_loss(labels, x), logits)[..., 0]
    assert np.all(grad[labels == -1] == 0.0) and np.all(grad[labels >= 0] != 0.0)
    # d/dx of the mean BCE is (sigmoid(x) - y) / number of sampled anchors
    sampled = labels >= 0
    want = (1 / (1 + np.exp(-np.float64(logits[..., 0]))) - (labels == 1)) / sampled.sum()
    np.testing.assert_allclose(grad[sampled], want[sampled], rtol=1e-5, atol=1e-8)
    grad = gradient(lambda x: losses.rpn_box_loss(labels, target, x), pred)
    assert np.all(grad[labels != 1] == 0.0) and np.all(np.abs(grad[labels == 1]).sum(-1) > 0)


def test_rpn_bad_logit_shape():
    with pytest.raises(ConfigError, match="rpn_logits"):
        losses.rpn_class_loss(np.zeros((1, 4), np.int32), np.zeros((1, 4, 2), np.float32))


# -- box head --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_head_losses_match_reference(seed):
    class_ids, valid, logits, target, deltas, _, _ = head_batch(seed)
    np.testing.assert_allclose(scalar(losses.head_class_loss(class_ids, logits, valid)),
                               np_head_class(class_ids, logits, valid), **TOL)
    np.testing.assert_allclose(scalar(losses.head_box_loss(class_ids, target, deltas)),
                               np_head_box(class_ids, target, deltas), **TOL)


def test_head_class_ignores_padding_rois():
    class_ids, valid, logits, _, _, _, _ = head_batch(11)
    base = float(losses.head_class_loss(class_ids, logits, valid))
    padding = valid == 0
    for fill in (50.0, -1e30, np.nan):
        changed = np.where(padding[..., None], fill, logits).astype(np.float32)
        assert float(losses.head_class_loss(class_ids, changed, valid)) == base
    garbage_ids = np.where(padding, 99, class_ids).astype(np.int32)  # out of range on padding rows
    assert float(losses.head_class_loss(garbage_ids, logits, valid)) == base
    # Background RoIs count (class 0 is a real target), padding rows do not.
    assert float(losses.head_class_loss(class_ids, logits, np.ones_like(valid))) != base
    grad = gradient(lambda x: losses.head_class_loss(class_ids, x, valid), logits)
    assert np.all(grad[padding] == 0.0) and np.all(np.abs(grad[~padding]).sum(-1) > 0)
    x = np.float64(logits)
    softmax = np.exp(x - x.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    want = (softmax - np.eye(logits.shape[-1])[class_ids]) / (~padding).sum()
    np.testing.assert_allclose(grad[~padding], want[~padding], rtol=1e-5, atol=1e-8)


def test_head_box_uses_only_the_target_class_deltas():
    class_ids, _, _, target, deltas, _, _ = head_batch(12)
    base = float(losses.head_box_loss(class_ids, target, deltas))
    chosen = np.zeros(deltas.shape[:3], bool)  # (B, N, C): the target class of positive RoIs
    b, n = np.nonzero(class_ids > 0)
    chosen[b, n, class_ids[b, n]] = True
    changed = np.where(chosen[..., None], deltas, np.nan).astype(np.float32)
    assert float(losses.head_box_loss(class_ids, target, changed)) == base
    changed_target = np.where((class_ids > 0)[..., None], target, np.nan).astype(np.float32)
    assert float(losses.head_box_loss(class_ids, changed_target, deltas)) == base
    # Moving the target class's deltas does change it.
    moved = deltas.copy()
    moved[b[0], n[0], class_ids[b[0], n[0]]] += 0.5
    assert float(losses.head_box_loss(class_ids, target, moved)) != base
    grad = gradient(lambda x: losses.head_box_loss(class_ids, target, x), deltas)
    assert np.all(grad[~chosen] == 0.0) and np.all(np.abs(grad[chosen]).sum(-1) > 0)


# -- mask head -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_mask_loss_matches_reference(seed):
    class_ids, _, _, _, _, masks, mask_logits = head_batch(seed)
    np.testing.assert_allclose(scalar(losses.mask_loss(class_ids, masks, mask_logits)),
                               np_mask(class_ids, masks, mask_logits), **TOL)
    probs = (1 / (1 + np.exp(-mask_logits))).astype(np.float32)
    np.testing.assert_allclose(scalar(losses.mask_loss(class_ids, masks, probs, from_logits=False)),
                               np_mask(class_ids, masks, probs, from_logits=False), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(losses.mask_loss(class_ids, masks[..., None], mask_logits)),
                               np_mask(class_ids, masks, mask_logits), **TOL)


def test_mask_loss_hand_computed():
    class_ids = np.array([[2, 0]], np.int32)
    masks = np.array([[[[1.0, 0.0]], [[1.0, 1.0]]]], np.float32)  # (1, 2, 1, 2)
    logits = np.zeros((1, 2, 1, 2, 3), np.float32)
    logits[0, 0, 0, 1, 2] = math.log(3.0)  # target 0, p = 3/4 -> log 4
    logits[0, 0, 0, 0, 1] = 100.0  # another class: unused
    # Pixel 0: log 2; pixel 1: log 4; the background RoI does not count.
    np.testing.assert_allclose(float(losses.mask_loss(class_ids, masks, logits)), math.log(8.0) / 2, rtol=1e-6)


def test_mask_loss_uses_only_positive_rois_and_target_channel():
    class_ids, _, _, _, _, masks, mask_logits = head_batch(13)
    base = float(losses.mask_loss(class_ids, masks, mask_logits))
    chosen = np.zeros(mask_logits.shape[:2] + mask_logits.shape[-1:], bool)  # (B, N, C)
    b, n = np.nonzero(class_ids > 0)
    chosen[b, n, class_ids[b, n]] = True
    chosen = np.broadcast_to(chosen[:, :, None, None, :], mask_logits.shape)
    changed = np.where(chosen, mask_logits, np.nan).astype(np.float32)
    assert float(losses.mask_loss(class_ids, masks, changed)) == base
    changed_masks = np.where((class_ids > 0)[..., None, None], masks, np.nan).astype(np.float32)
    assert float(losses.mask_loss(class_ids, changed_masks, mask_logits)) == base
    probs = (1 / (1 + np.exp(-mask_logits))).astype(np.float32)
    base_p = float(losses.mask_loss(class_ids, masks, probs, from_logits=False))
    assert float(losses.mask_loss(class_ids, masks, np.where(chosen, probs, np.nan), from_logits=False)) == base_p

    grad = gradient(lambda x: losses.mask_loss(class_ids, masks, x), mask_logits)
    assert np.all(grad[~chosen] == 0.0) and np.all(grad[chosen] != 0.0)
    # d/dx of the pixel-mean BCE is (sigmoid(x) - y) / (positive RoIs * pixels)
    pixels = (class_ids > 0).sum() * masks.shape[2] * masks.shape[3]
    picked = mask_logits[b, n, :, :, class_ids[b, n]]  # (P, mh, mw)
    want = (1 / (1 + np.exp(-np.float64(picked))) - masks[b, n]) / pixels
    np.testing.assert_allclose(grad[b, n, :, :, class_ids[b, n]], want, rtol=1e-5, atol=1e-9)
    grad = gradient(lambda x: losses.mask_loss(class_ids, masks, x, from_logits=False), probs)
    assert np.all(grad[~chosen] == 0.0)


# -- degenerate batches ----------------------------------------------------------------------------
def test_no_positives_or_all_ignored_give_zero_with_finite_gradients():
    labels, logits, target, pred = rpn_batch(3)
    ignored = np.full_like(labels, -1)
    negatives = np.zeros_like(labels)
    assert scalar(losses.rpn_class_loss(ignored, logits)) == 0.0
    assert scalar(losses.rpn_box_loss(negatives, target, pred)) == 0.0
    assert scalar(losses.rpn_class_loss(negatives, logits)) > 0.0  # background anchors still count
    for grad in (gradient(lambda x: losses.rpn_class_loss(ignored, x), logits),
                 gradient(lambda x: losses.rpn_box_loss(negatives, target, x), pred)):
        assert np.all(grad == 0.0)

    class_ids, valid, logits, target, deltas, masks, mask_logits = head_batch(3)
    background = np.zeros_like(class_ids)
    assert scalar(losses.head_class_loss(class_ids, logits, np.zeros_like(valid))) == 0.0
    assert scalar(losses.head_box_loss(background, target, deltas)) == 0.0
    assert scalar(losses.mask_loss(background, masks, mask_logits)) == 0.0
    assert scalar(losses.mask_loss(background, masks, mask_logits, from_logits=False)) == 0.0
    for grad in (gradient(lambda x: losses.head_class_loss(class_ids, x, np.zeros_like(valid)), logits),
                 gradient(lambda x: losses.head_box_loss(background, target, x), deltas),
                 gradient(lambda x: losses.mask_loss(background, masks, x), mask_logits)):
        assert np.all(grad == 0.0)


# -- compiled graphs -------------------------------------------------------------------------------
def test_losses_in_tf_function_with_dynamic_batch():
    labels, logits, target, pred = rpn_batch(21)
    A = labels.shape[1]
    rpn_class = tf.function(losses.rpn_class_loss, input_signature=[
        tf.TensorSpec((None, A), tf.int32), tf.TensorSpec((None, A, 1), tf.float32)])
    rpn_box = tf.function(losses.rpn_box_loss, input_signature=[
        tf.TensorSpec((None, A), tf.int32), tf.TensorSpec((None, A, 4), tf.float32),
        tf.TensorSpec((None, A, 4), tf.float32)])
    np.testing.assert_allclose(float(rpn_class(labels, logits)), np_rpn_class(labels, logits), **TOL)
    np.testing.assert_allclose(float(rpn_box(labels, target, pred)), np_rpn_box(labels, target, pred), **TOL)

    class_ids, valid, logits, target, deltas, masks, mask_logits = head_batch(21)
    _, N, C = logits.shape
    mh, mw = masks.shape[2:]
    ids = tf.TensorSpec((None, N), tf.int32)
    head_class = tf.function(losses.head_class_loss, input_signature=[
        ids, tf.TensorSpec((None, N, C), tf.float32), tf.TensorSpec((None, N), tf.float32)])
    head_box = tf.function(losses.head_box_loss, input_signature=[
        ids, tf.TensorSpec((None, N, 4), tf.float32), tf.TensorSpec((None, N, C, 4), tf.float32)])
    mask = tf.function(losses.mask_loss, input_signature=[
        ids, tf.TensorSpec((None, N, mh, mw), tf.float32), tf.TensorSpec((None, N, mh, mw, C), tf.float32)])
    np.testing.assert_allclose(float(head_class(class_ids, logits, valid)),
                               np_head_class(class_ids, logits, valid), **TOL)
    np.testing.assert_allclose(float(head_box(class_ids, target, deltas)),
                               np_head_box(class_ids, target, deltas), **TOL)
    np.testing.assert_allclose(float(mask(class_ids, masks, mask_logits)),
                               np_mask(class_ids, masks, mask_logits), **TOL)


@pytest.mark.jax
def test_losses_under_jax_jit():
    pytest.importorskip("jax")
    code = """
        import math
        import numpy as np, keras, jax
        from kseg.tasks.maskrcnn import losses
        assert keras.backend.backend() == "jax"
        rng = np.random.default_rng(5)
        B, A, N, C, M = 2, 30, 8, 3, 4
        labels = rng.choice([-1, 0, 1], size=(B, A)).astype(np.int32)
        logits = rng.normal(0, 2, (B, A, 1)).astype(np.float32)
        t_rpn = rng.normal(size=(B, A, 4)).astype(np.float32)
        p_rpn = rng.normal(size=(B, A, 4)).astype(np.float32)
        class_ids = rng.integers(0, C, (B, N)).astype(np.int32)
        class_ids[0, 0] = 1
        valid = np.ones((B, N), np.float32)
        valid[1, -2:] = 0
        class_ids[1, -2:] = 0
        cls_logits = rng.normal(size=(B, N, C)).astype(np.float32)
        t_box = rng.normal(size=(B, N, 4)).astype(np.float32)
        deltas = rng.normal(size=(B, N, C, 4)).astype(np.float32)
        masks = (rng.random((B, N, M, M)) < 0.5).astype(np.float32)
        mask_logits = rng.normal(size=(B, N, M, M, C)).astype(np.float32)

        def bce(x, y):
            x = np.float64(x)
            return np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))

        def smooth_l1(d):
            a = np.abs(np.float64(d))
            return np.where(a < 1, 0.5 * a * a, a - 0.5).sum(-1)

        def close(got, want):
            assert abs(float(got) - want) <= 2e-5 * max(1.0, abs(want)), (float(got), want)

        sampled = labels >= 0
        close(jax.jit(losses.rpn_class_loss)(labels, logits),
              bce(logits[..., 0], labels == 1)[sampled].mean())
        close(jax.jit(losses.rpn_box_loss)(labels, t_rpn, p_rpn), smooth_l1(p_rpn - t_rpn)[labels == 1].mean())
        x = np.float64(cls_logits)
        log_p = x - np.log(np.exp(x).sum(-1, keepdims=True))
        ce = -np.take_along_axis(log_p, class_ids[..., None], -1)[..., 0]
        close(jax.jit(losses.head_class_loss)(class_ids, cls_logits, valid), ce[valid > 0].mean())
        pos = class_ids > 0
        b, n = np.nonzero(pos)
        close(jax.jit(losses.head_box_loss)(class_ids, t_box, deltas),
              smooth_l1(deltas[b, n, class_ids[b, n]] - t_box[b, n]).mean())
        close(jax.jit(losses.mask_loss)(class_ids, masks, mask_logits),
              bce(mask_logits[b, n, :, :, class_ids[b, n]], masks[b, n]).mean())

        grad = np.asarray(jax.jit(jax.grad(lambda d: losses.mask_loss(class_ids, masks, d)))(mask_logits))
        chosen = np.zeros((B, N, C), bool)
        chosen[b, n, class_ids[b, n]] = True
        assert np.all(np.isfinite(grad))
        assert np.all(grad.transpose(0, 1, 4, 2, 3)[~chosen] == 0)
        assert np.all(grad.transpose(0, 1, 4, 2, 3)[chosen] != 0)
        zero = jax.jit(losses.head_box_loss)(np.zeros_like(class_ids), t_box, deltas)
        assert float(zero) == 0.0
        print("ok")
    """
    run_on_jax(code)
