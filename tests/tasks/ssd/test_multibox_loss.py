"""kseg.tasks.ssd.losses (SSD multibox with hard-negative mining, RetinaNet focal) and
``ssd_targets`` against straightforward NumPy references (loops, float64) and hand-computed values."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import tensorflow as tf
from backends import run_on_jax
from hypothesis import given, settings
from hypothesis import strategies as st

from kseg.nn.box_ops import default_boxes, encode_boxes
from kseg.tasks.ssd import losses

TOL = dict(rtol=2e-5, atol=1e-6)


# -- NumPy references ------------------------------------------------------------------------------
def np_log_softmax(x):
    x = np.float64(x)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_smooth_l1(d):
    a = np.abs(np.float64(d))
    return np.where(a < 1.0, 0.5 * a * a, a - 0.5)


def np_multibox(t_off, t_lab, p_off, p_log, neg_pos_ratio=3.0, alpha=1.0, min_negatives=0):
    """SSD loss box by box: positives' CE + top-k negatives' CE (k per image) + alpha * smooth L1."""
    conf = loc = 0.0
    total_pos = 0
    for b in range(t_lab.shape[0]):
        log_p = np_log_softmax(p_log[b])
        n_pos = 0
        negative_losses = []
        for n in range(t_lab.shape[1]):
            label = int(t_lab[b, n])
            if label > 0:
                n_pos += 1
                conf += -log_p[n, label]
                loc += float(np_smooth_l1(p_off[b, n] - t_off[b, n]).sum())
            elif label == 0:
                negative_losses.append(-log_p[n, 0])
        k = max(int(math.floor(neg_pos_ratio * n_pos)), min_negatives)
        conf += sum(sorted(negative_losses, reverse=True)[:k])
        total_pos += n_pos
    return (conf + alpha * loc) / max(total_pos, 1)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.float64(x)))


def np_multibox_focal(t_off, t_lab, p_off, p_log, gamma=2.0, alpha=0.25, loc_weight=1.0):
    """Focal loss element by element over the foreground classes of non-ignored boxes."""
    focal = loc = 0.0
    total_pos = 0
    n_classes = p_log.shape[-1]
    for b in range(t_lab.shape[0]):
        for n in range(t_lab.shape[1]):
            label = int(t_lab[b, n])
            if label < 0:
                continue
            if label > 0:
                total_pos += 1
                loc += float(np_smooth_l1(p_off[b, n] - t_off[b, n]).sum())
            for c in range(1, n_classes):
                y = 1.0 if c == label else 0.0
                p = np_sigmoid(p_log[b, n, c])
                p_t = p if y else 1.0 - p
                a_t = 1.0 if alpha is None else (alpha if y else 1.0 - alpha)
                focal += -a_t * (1.0 - p_t) ** gamma * math.log(p_t)
    return (focal + loc_weight * loc) / max(total_pos, 1)


def random_batch(seed, batch=4, n_boxes=30, n_classes=4):
    """Image 0: usual mix; 1: no positives; 2: many ignored boxes; 3: more negatives wanted than exist."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random((batch, n_boxes)) < 0.2, rng.integers(1, n_classes, (batch, n_boxes)), 0)
    labels[1] = np.where(rng.random(n_boxes) < 0.3, -1, 0)  # no positives, some ignored
    labels[2, rng.random(n_boxes) < 0.4] = -1
    labels[2, 0] = 1
    if batch > 3:
        labels[3] = rng.integers(1, n_classes, n_boxes)  # mostly positives ...
        labels[3, :4] = 0  # ... only 4 negatives, fewer than 3 * positives
        labels[3, 4:6] = -1
    t_off = rng.normal(0.0, 1.5, (batch, n_boxes, 4))
    t_off[labels < 0] = 1e6  # garbage stored for ignored boxes must not leak in
    p_off = rng.normal(0.0, 1.5, (batch, n_boxes, 4))
    p_log = rng.normal(0.0, 2.0, (batch, n_boxes, n_classes))
    return (t_off.astype(np.float32), labels.astype(np.int32), p_off.astype(np.float32),
            p_log.astype(np.float32))


# -- multibox_loss ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,alpha,min_neg", [(3.0, 1.0, 0), (3.0, 0.5, 2), (1.5, 2.0, 1), (0.0, 1.0, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_multibox_matches_numpy_reference(seed, ratio, alpha, min_neg):
    batch = random_batch(seed)
    got = losses.multibox_loss(*batch, neg_pos_ratio=ratio, alpha=alpha, min_negatives=min_neg)
    assert got.dtype == "float32" and tuple(got.shape) == ()
    want = np_multibox(*batch, neg_pos_ratio=ratio, alpha=alpha, min_negatives=min_neg)
    np.testing.assert_allclose(float(got), want, **TOL)


def test_multibox_image_without_positives_counts_only_min_negatives():
    t_off, labels, p_off, p_log = random_batch(3)
    base = np_multibox(t_off, labels, p_off, p_log, min_negatives=0)
    with_min = np_multibox(t_off, labels, p_off, p_log, min_negatives=2)
    # Image 1 has no positives: with min_negatives=2 its two hardest negatives join the numerator.
    log_p = np_log_softmax(p_log[1])
    hardest = sorted(-log_p[labels[1] == 0, 0], reverse=True)[:2]
    total_pos = int((labels > 0).sum())
    extra = sum(hardest) / total_pos
    # The other images already keep >= 2 negatives, except image 3 that keeps all 4 it has.
    np.testing.assert_allclose(with_min - base, extra, rtol=1e-10)
    np.testing.assert_allclose(float(losses.multibox_loss(t_off, labels, p_off, p_log)), base, **TOL)
    np.testing.assert_allclose(float(losses.multibox_loss(t_off, labels, p_off, p_log, min_negatives=2)),
                               with_min, **TOL)


def test_multibox_batch_without_any_positive_divides_by_one():
    rng = np.random.default_rng(5)
    labels = np.array([[0, 0, -1, 0, 0], [0, -1, 0, 0, 0]], np.int32)
    p_log = rng.normal(size=(2, 5, 3)).astype(np.float32)
    offsets = rng.normal(size=(2, 5, 4)).astype(np.float32)
    assert float(losses.multibox_loss(offsets, labels, offsets + 1, p_log)) == 0.0
    log_p = np_log_softmax(p_log)
    want = sum(sorted(-log_p[b, labels[b] == 0, 0], reverse=True)[0] for b in range(2))
    got = losses.multibox_loss(offsets, labels, offsets + 1, p_log, min_negatives=1)
    np.testing.assert_allclose(float(got), want, **TOL)


def test_multibox_hand_computed():
    # 1 image, 4 boxes, 2 classes: a positive, two negatives, an ignored box.
    labels = np.array([[1, 0, 0, -1]], np.int32)
    p_log = np.array([[[0.0, 0.0],            # positive: CE = log 2
                       [0.0, 0.0],            # negative, background loss log 2 (the hard one)
                       [math.log(3.0), 0.0],  # negative, background loss log(4/3)
                       [-10.0, 10.0]]],       # ignored (would cost ~20)
                     np.float32)
    t_off = np.zeros((1, 4, 4), np.float32)
    p_off = np.array([[[0.5, -2.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0], [5.0] * 4, [5.0] * 4]], np.float32)
    loc = 0.5 * 0.25 + (2.0 - 0.5)  # 1.625, positive box only
    got = losses.multibox_loss(t_off, labels, p_off, p_log, neg_pos_ratio=1.0)
    np.testing.assert_allclose(float(got), 2 * math.log(2.0) + loc, rtol=1e-6)
    # Ratio 3 wants 3 negatives; both available ones are kept.
    got = losses.multibox_loss(t_off, labels, p_off, p_log, neg_pos_ratio=3.0, alpha=2.0)
    np.testing.assert_allclose(float(got), 2 * math.log(2.0) + math.log(4.0 / 3.0) + 2.0 * loc, rtol=1e-6)
    # No mining: only the positive's CE.
    got = losses.multibox_loss(t_off, labels, p_off, p_log, neg_pos_ratio=0.0, alpha=0.0)
    np.testing.assert_allclose(float(got), math.log(2.0), rtol=1e-6)


def mining_case():
    """1 image, 2 positives, 8 negatives of known background loss, 2 ignored; ratio 2 keeps 4."""
    labels = np.array([[1, 2, 0, 0, 0, 0, 0, 0, 0, 0, -1, -1]], np.int32)
    p_log = np.zeros((1, 12, 3), np.float32)
    # Background loss of a negative grows with its foreground logits; boxes 3, 5, 7, 9 are hardest.
    fg = [0.0, 0.0, -1.0, 2.5, -0.5, 3.0, -2.0, 1.5, 0.2, 2.0, 4.0, 4.0]
    p_log[0, :, 1] = fg
    p_log[0, :, 2] = np.array(fg) * 0.5
    rng = np.random.default_rng(2)
    t_off = rng.normal(size=(1, 12, 4)).astype(np.float32)
    p_off = rng.normal(size=(1, 12, 4)).astype(np.float32)
    return t_off, labels, p_off, p_log, [3, 5, 7, 9], [2, 4, 6, 8]


def test_hard_negative_mining_gradients_are_zero_for_unselected():
    t_off, labels, p_off, p_log, selected, unselected = mining_case()
    logits = tf.Variable(p_log)
    offsets = tf.Variable(p_off)
    with tf.GradientTape() as tape:
        loss = losses.multibox_loss(t_off, labels, offsets, logits, neg_pos_ratio=2.0)
    grad_logits, grad_offsets = (g.numpy()[0] for g in tape.gradient(loss, [logits, offsets]))
    np.testing.assert_allclose(float(loss), np_multibox(t_off, labels, p_off, p_log, 2.0), **TOL)
    for n in unselected + [10, 11]:  # unselected negatives and ignored boxes
        assert np.all(grad_logits[n] == 0.0), n
    for n in selected + [0, 1]:
        assert np.all(np.abs(grad_logits[n]) > 1e-4), n
    # A selected negative's gradient is softmax - one_hot(0), divided by the 2 positives.
    probs = np.exp(np_log_softmax(p_log[0]))
    np.testing.assert_allclose(grad_logits[3], (probs[3] - [1, 0, 0]) / 2, rtol=1e-5, atol=1e-7)
    assert np.all(grad_offsets[2:] == 0.0) and np.all(np.abs(grad_offsets[:2]) > 0)


def test_hard_negative_mining_value_depends_only_on_selected():
    t_off, labels, p_off, p_log, selected, unselected = mining_case()
    base = float(losses.multibox_loss(t_off, labels, p_off, p_log, neg_pos_ratio=2.0))
    for n in unselected:  # made a bit harder or easier but still below the 4th hardest (0.2 vs 1.5)
        for delta in (-1.0, 0.5):
            changed = p_log.copy()
            changed[0, n, 1] += delta
            assert float(losses.multibox_loss(t_off, labels, p_off, changed, neg_pos_ratio=2.0)) == base
    for n in selected:
        changed = p_log.copy()
        changed[0, n, 1] += 0.3
        value = float(losses.multibox_loss(t_off, labels, p_off, changed, neg_pos_ratio=2.0))
        assert value > base + 1e-3
        np.testing.assert_allclose(value, np_multibox(t_off, labels, p_off, changed, 2.0), **TOL)
    # Making an unselected negative the hardest swaps it in for the 4th (box 7, fg 1.5).
    changed = p_log.copy()
    changed[0, 2, 1] = 6.0
    np.testing.assert_allclose(float(losses.multibox_loss(t_off, labels, p_off, changed, neg_pos_ratio=2.0)),
                               np_multibox(t_off, labels, p_off, changed, 2.0), **TOL)


def test_multibox_in_tf_function_with_dynamic_batch():
    batch = random_batch(7)
    spec = [tf.TensorSpec((None, 30, 4), tf.float32), tf.TensorSpec((None, 30), tf.int32),
            tf.TensorSpec((None, 30, 4), tf.float32), tf.TensorSpec((None, 30, 4), tf.float32)]
    graph_loss = tf.function(lambda *a: losses.multibox_loss(*a, min_negatives=1), input_signature=spec)
    np.testing.assert_allclose(float(graph_loss(*batch)), np_multibox(*batch, min_negatives=1), **TOL)
    graph_focal = tf.function(lambda *a: losses.multibox_focal_loss(*a), input_signature=spec)
    np.testing.assert_allclose(float(graph_focal(*batch)), np_multibox_focal(*batch), **TOL)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), n_boxes=st.integers(1, 12),
       n_classes=st.integers(2, 4), ratio=st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_neg=st.integers(0, 3))
def test_multibox_property_against_reference(seed, batch, n_boxes, n_classes, ratio, min_neg):
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, n_classes, (batch, n_boxes)).astype(np.int32)
    t_off = rng.normal(size=(batch, n_boxes, 4)).astype(np.float32)
    p_off = rng.normal(size=(batch, n_boxes, 4)).astype(np.float32)
    p_log = rng.normal(0.0, 3.0, (batch, n_boxes, n_classes)).astype(np.float32)
    got = float(losses.multibox_loss(t_off, labels, p_off, p_log, neg_pos_ratio=ratio, min_negatives=min_neg))
    np.testing.assert_allclose(got, np_multibox(t_off, labels, p_off, p_log, ratio, 1.0, min_neg), **TOL)


# -- multibox_focal_loss ---------------------------------------------------------------------------
@pytest.mark.parametrize("gamma,alpha,loc_weight", [(2.0, 0.25, 1.0), (0.5, 0.75, 2.0), (0.0, None, 1.0),
                                                    (2.0, None, 0.0)])
def test_focal_matches_numpy_reference(gamma, alpha, loc_weight):
    batch = random_batch(11)
    got = losses.multibox_focal_loss(*batch, gamma=gamma, alpha=alpha, loc_weight=loc_weight)
    assert got.dtype == "float32" and tuple(got.shape) == ()
    np.testing.assert_allclose(float(got), np_multibox_focal(*batch, gamma, alpha, loc_weight), **TOL)


def test_focal_gamma_zero_is_weighted_sigmoid_cross_entropy():
    t_off, labels, p_off, p_log = random_batch(12)
    valid = labels >= 0
    targets = np.eye(p_log.shape[-1])[np.maximum(labels, 0)][..., 1:]
    p = np_sigmoid(p_log[..., 1:])
    bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    n_pos = (labels > 0).sum()
    loc = (np_smooth_l1(p_off - t_off).sum(-1) * (labels > 0)).sum()
    plain = (bce * valid[..., None]).sum()
    got = losses.multibox_focal_loss(t_off, labels, p_off, p_log, gamma=0.0, alpha=None, loc_weight=0.0)
    np.testing.assert_allclose(float(got), plain / n_pos, **TOL)
    got = losses.multibox_focal_loss(t_off, labels, p_off, p_log, gamma=0.0, alpha=0.5, loc_weight=1.0)
    np.testing.assert_allclose(float(got), (0.5 * plain + loc) / n_pos, **TOL)
    # alpha weighs positives by alpha and negatives by 1 - alpha.
    pos_part = (bce * targets * valid[..., None]).sum()
    got = losses.multibox_focal_loss(t_off, labels, p_off, p_log, gamma=0.0, alpha=0.9, loc_weight=0.0)
    np.testing.assert_allclose(float(got), (0.9 * pos_part + 0.1 * (plain - pos_part)) / n_pos, **TOL)


def test_focal_ignores_background_column_and_ignored_boxes():
    t_off, labels, p_off, p_log = random_batch(13)
    logits = tf.Variable(p_log)
    with tf.GradientTape() as tape:
        loss = losses.multibox_focal_loss(t_off, labels, p_off, logits)
    grad = tape.gradient(loss, logits).numpy()
    assert np.all(grad[..., 0] == 0.0)
    assert np.all(grad[labels < 0] == 0.0)
    assert np.all(np.abs(grad[labels >= 0][:, 1:]) > 0.0)
    changed = p_log.copy()
    changed[..., 0] = 50.0
    assert float(losses.multibox_focal_loss(t_off, labels, p_off, changed)) == float(loss)


def test_focal_gamma_zero_has_finite_gradient_when_saturated():
    labels = np.array([[1, 0]], np.int32)
    logits = tf.Variable(np.array([[[0.0, 200.0], [0.0, -200.0]]], np.float32))  # p_t == 1 in float32
    zeros = np.zeros((1, 2, 4), np.float32)
    for gamma in (0.0, 2.0):
        with tf.GradientTape() as tape:
            loss = losses.multibox_focal_loss(zeros, labels, zeros, logits, gamma=gamma)
        grad = tape.gradient(loss, logits).numpy()
        assert float(loss) == 0.0 and np.all(np.isfinite(grad)), gamma


# -- ssd_targets -----------------------------------------------------------------------------------
def test_ssd_targets_default_box_truth_encodes_to_zero():
    anchors = default_boxes([(3, 3), (1, 1)], (96, 96))
    truth = np.stack([anchors[7], [0.05, 0.1, 0.45, 0.3], [0, 0, 0, 0]]).astype(np.float32)
    truth_labels = np.array([3, 2, -1], np.int32)
    offsets, labels = losses.ssd_targets(truth, truth_labels, anchors)
    offsets, labels = np.asarray(offsets), np.asarray(labels)
    assert offsets.shape == (len(anchors), 4) and labels.shape == (len(anchors),)
    assert labels.dtype == np.int32
    assert labels[7] == 3
    np.testing.assert_allclose(offsets[7], 0.0, atol=1e-6)
    assert set(np.unique(labels)) <= {0, 2, 3} and 2 in labels
    np.testing.assert_allclose(offsets[labels == 0], 0.0, atol=1e-6)  # background encodes its own box
    j = int(np.flatnonzero(labels == 2)[0])
    want = np.asarray(encode_boxes(truth[1:2], anchors[j:j + 1]))[0]
    np.testing.assert_allclose(offsets[j], want, rtol=1e-6)
    assert np.abs(offsets[j]).max() > 0.1
    # With custom variances offsets scale accordingly.
    scaled, _ = losses.ssd_targets(truth, truth_labels, anchors, variances=(1.0, 1.0, 1.0, 1.0))
    np.testing.assert_allclose(np.asarray(scaled)[j], want * [0.1, 0.1, 0.2, 0.2], rtol=1e-5, atol=1e-7)


def test_ssd_targets_feed_multibox_loss():
    anchors = default_boxes([(2, 2)], (64, 64))
    truth = anchors[[1, 6]]
    offsets, labels = losses.ssd_targets(truth, np.array([1, 2]), anchors)
    t_off = np.asarray(offsets)[None]
    t_lab = np.asarray(labels)[None]
    p_log = np.random.default_rng(0).normal(size=(1, len(anchors), 3)).astype(np.float32)
    # A perfect regression leaves only the confidence term.
    got = float(losses.multibox_loss(t_off, t_lab, t_off, p_log))
    np.testing.assert_allclose(got, np_multibox(t_off, t_lab, t_off, p_log), **TOL)


# -- JAX backend -----------------------------------------------------------------------------------
def test_multibox_under_jax_jit():
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    code = """
        import math
        import numpy as np, keras, jax
        from kseg.tasks.ssd import losses
        assert keras.backend.backend() == "jax"
        rng = np.random.default_rng(21)
        B, N, C = 3, 20, 4
        labels = np.where(rng.random((B, N)) < 0.25, rng.integers(1, C, (B, N)), 0).astype(np.int32)
        labels[1] = np.where(rng.random(N) < 0.3, -1, 0)  # an image without positives
        labels[2, :3] = -1
        t_off = rng.normal(size=(B, N, 4)).astype(np.float32)
        p_off = rng.normal(size=(B, N, 4)).astype(np.float32)
        p_log = rng.normal(0, 2, (B, N, C)).astype(np.float32)

        def reference(ratio, min_neg):
            conf = loc = 0.0
            total = 0
            for b in range(B):
                x = p_log[b].astype(np.float64)
                log_p = x - x.max(-1, keepdims=True)
                log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
                pos = labels[b] > 0
                conf += -log_p[pos, labels[b][pos]].sum()
                d = np.abs(p_off[b][pos].astype(np.float64) - t_off[b][pos])
                loc += np.where(d < 1, 0.5 * d * d, d - 0.5).sum()
                k = max(int(math.floor(ratio * pos.sum())), min_neg)
                conf += np.sort(-log_p[labels[b] == 0, 0])[::-1][:k].sum()
                total += int(pos.sum())
            return (conf + loc) / max(total, 1)

        fn = jax.jit(lambda a, b, c, d: losses.multibox_loss(a, b, c, d, neg_pos_ratio=3.0, min_negatives=2))
        got = float(fn(t_off, labels, p_off, p_log))
        want = reference(3.0, 2)
        assert abs(got - want) <= 2e-5 * max(1.0, abs(want)), (got, want)

        # Gradients of negatives that are not mined are exactly zero under jit too.
        loss_of_logits = lambda d: losses.multibox_loss(t_off, labels, p_off, d, neg_pos_ratio=1.0)
        grad = jax.jit(jax.grad(loss_of_logits))(p_log)
        grad = np.asarray(grad)
        for b in range(B):
            assert np.all(grad[b][labels[b] < 0] == 0)
            negatives = np.flatnonzero(labels[b] == 0)
            nonzero = [n for n in negatives if np.any(grad[b, n] != 0)]
            assert len(nonzero) == min(int((labels[b] > 0).sum()), len(negatives)), (b, len(nonzero))

        focal = jax.jit(losses.multibox_focal_loss)(t_off, labels, p_off, p_log)
        assert np.isfinite(float(focal)) and float(focal) > 0
        print("ok")
    """
    run_on_jax(code)
