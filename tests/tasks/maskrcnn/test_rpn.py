"""RPN: FPN anchors, the shared head, the per-image targets and the proposal layer, checked against
hand-computed anchors and independent NumPy references (convolution, IoU, labelling, decoding,
greedy NMS), on TensorFlow (eager and in a compiled model) and once on JAX under ``jax.jit``."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from backends import run_on_jax

from kseg.core.errors import ConfigError
from kseg.tasks.maskrcnn import rpn
from kseg.nn.box_ops import VARIANCES, decode_boxes, encode_boxes
from kseg.nn.kernels import portable_kernels
from kseg.tasks.maskrcnn.rpn import (
    ProposalLayer,
    _level_shapes,
    fpn_anchors,
    rpn_head,
    rpn_targets,
)

SQRT2 = np.sqrt(2.0)


def to_np(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


# ----------------------------------------------------------------------------- references


def reference_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (N, M) of corner boxes, float64."""
    a, b = a.astype(np.float64)[:, None], b.astype(np.float64)[None]
    inter = (np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
             * np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None))
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def reference_anchors(image_size, strides, scales, ratios) -> np.ndarray:
    """The anchors one at a time, in the documented order."""
    h, w = image_size
    out = []
    for stride, scale in zip(strides, scales):
        for i in range(-(-h // stride)):
            for j in range(-(-w // stride)):
                cy, cx = (i + 0.5) * stride, (j + 0.5) * stride
                for r in ratios:
                    bh, bw = scale * np.sqrt(r), scale / np.sqrt(r)
                    out.append([(cy - bh / 2) / h, (cx - bw / 2) / w, (cy + bh / 2) / h, (cx + bw / 2) / w])
    return np.array(out)


def reference_labels(gt: np.ndarray, anchors: np.ndarray, pos_iou=0.7, neg_iou=0.3):
    """(positive mask, negative mask, best truth per anchor) before sampling."""
    iou = reference_iou(anchors, gt)  # (A, T)
    best = iou.max(axis=1)
    gt_best = iou.max(axis=0)
    # Ties within 1e-6 (relative) count: symmetric anchors differ by float32 rounding.
    forced = (np.isclose(iou, gt_best[None], rtol=1e-6, atol=0) & (gt_best[None] > 0)).any(axis=1)
    positive = forced | (best >= pos_iou)
    negative = (best < neg_iou) & ~positive
    return positive, negative, iou.argmax(axis=1)


def reference_decode(deltas: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    v = np.array(VARIANCES)
    ah, aw = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    cy = (anchors[..., 0] + anchors[..., 2]) / 2 + deltas[..., 0] * v[0] * ah
    cx = (anchors[..., 1] + anchors[..., 3]) / 2 + deltas[..., 1] * v[1] * aw
    h, w = ah * np.exp(deltas[..., 2] * v[2]), aw * np.exp(deltas[..., 3] * v[3])
    return np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=-1)


def reference_proposals(logits, deltas, anchors, pre, post, nms_iou, min_size=0.0) -> np.ndarray:
    """Top-k, decode, clip, size filter, textbook greedy NMS and zero padding for each image."""
    out = np.zeros((len(logits), post, 4))
    for b in range(len(logits)):
        scores = 1 / (1 + np.exp(-logits[b, :, 0].astype(np.float64)))
        order = np.argsort(-scores, kind="stable")[:pre]
        boxes = np.clip(reference_decode(deltas[b, order].astype(np.float64), anchors[order].astype(np.float64)), 0, 1)
        big = (boxes[:, 2] - boxes[:, 0] > min_size) & (boxes[:, 3] - boxes[:, 1] > min_size)
        kept: list[int] = []
        for i in range(len(order)):
            if big[i] and all(reference_iou(boxes[[i]], boxes[[j]])[0, 0] <= nms_iou for j in kept):
                kept.append(i)
        kept = kept[:post]
        out[b, : len(kept)] = boxes[kept]
    return out


def reference_conv_same(x, kernel, bias):
    """NumPy 'same' convolution (stride 1) of (B, h, w, C) with an (n, n, C, F) kernel."""
    n = kernel.shape[0]
    pad = n // 2
    xp = np.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    h, w = x.shape[1:3]
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
    for di in range(n):
        for dj in range(n):
            out += xp[:, di:di + h, dj:dj + w, :] @ kernel[di, dj]
    return out + bias


# ----------------------------------------------------------------------------- anchors


def test_fpn_anchors_hand_checked_tiny_case():
    anchors = fpn_anchors((64, 64), strides=(16, 32), scales=(16, 32))
    assert anchors.shape == (4 * 4 * 3 + 2 * 2 * 3, 4) and anchors.dtype == np.float32
    px = anchors * 64.0
    # Level 1, position (0, 0), centre (8, 8): ratio 0.5 (h/w) is 8*sqrt2 high and 16*sqrt2 wide.
    np.testing.assert_allclose(px[0], [8 - 4 * SQRT2, 8 - 8 * SQRT2, 8 + 4 * SQRT2, 8 + 8 * SQRT2], atol=1e-4)
    np.testing.assert_allclose(px[1], [0, 0, 16, 16], atol=1e-5)
    np.testing.assert_allclose(px[2], [8 - 8 * SQRT2, 8 - 4 * SQRT2, 8 + 8 * SQRT2, 8 + 4 * SQRT2], atol=1e-4)
    np.testing.assert_allclose(px[3 * 1 + 1], [0, 16, 16, 32], atol=1e-5)  # position (0, 1): row-major
    np.testing.assert_allclose(px[3 * 4 + 1], [16, 0, 32, 16], atol=1e-5)  # position (1, 0)
    np.testing.assert_allclose(px[3 * 15 + 1], [48, 48, 64, 64], atol=1e-5)  # last of level 1
    # Level 2 (stride 32, scale 32) starts at row 48: position (0, 0) centred at (16, 16).
    np.testing.assert_allclose(px[48 + 1], [0, 0, 32, 32], atol=1e-5)
    np.testing.assert_allclose(px[-1], [48 - 16 * SQRT2, 48 - 8 * SQRT2, 48 + 16 * SQRT2, 48 + 8 * SQRT2],
                               atol=1e-4)
    assert anchors.min() < 0 and anchors.max() > 1  # not clipped


def test_fpn_anchors_non_square_stride_and_counts():
    # 64 high, 128 wide: normalised per axis, square in pixels.
    anchors = fpn_anchors((64, 128), strides=(32,), scales=(32,), ratios=(1,))
    assert anchors.shape == (2 * 4, 4)
    np.testing.assert_allclose(anchors[1], [0, 32 / 128, 32 / 64, 64 / 128], atol=1e-7)
    np.testing.assert_allclose((anchors[:, 2] - anchors[:, 0]) * 64, (anchors[:, 3] - anchors[:, 1]) * 128)
    # anchor_stride 2 keeps every other grid cell: centres 8 and 40 on a 4x4 stride-16 grid.
    strided = fpn_anchors((64, 64), strides=(16,), scales=(16,), ratios=(1,), anchor_stride=2) * 64
    np.testing.assert_allclose(strided, [[0, 0, 16, 16], [0, 32, 16, 48], [32, 0, 48, 16], [32, 32, 48, 48]],
                               atol=1e-5)
    # Default P2..P6 on a 256 px input (CPU scales), and sizes that are not multiples of the strides.
    assert len(fpn_anchors(256, scales=(8, 16, 32, 64, 128))) == (64**2 + 32**2 + 16**2 + 8**2 + 4**2) * 3
    assert _level_shapes((100, 70), (16, 32)) == [(7, 5), (4, 3)]
    got = fpn_anchors((96, 72), strides=(8, 16, 32), scales=(16, 32, 64), ratios=(0.5, 1, 2))
    np.testing.assert_allclose(got, reference_anchors((96, 72), (8, 16, 32), (16, 32, 64), (0.5, 1, 2)), atol=1e-6)


@pytest.mark.parametrize("kwargs", [
    {"strides": (4, 8), "scales": (8,)},
    {"ratios": (1, -2)},
    {"ratios": ()},
    {"scales": (8, 16, 0, 64, 128)},
    {"anchor_stride": 0},
])
def test_fpn_anchors_rejects_bad_options(kwargs):
    with pytest.raises(ConfigError):
        fpn_anchors((64, 64), **kwargs)


# ----------------------------------------------------------------------------- head


def test_rpn_head_shapes_shared_weights_and_order():
    rng = np.random.default_rng(0)
    sizes, channels, k = [(8, 8), (4, 4), (2, 2)], 4, 3
    inputs = [keras.Input((h, w, channels)) for h, w in sizes]
    logits, deltas = rpn_head(inputs, anchors_per_location=k, channels=5)
    model = keras.Model(inputs, [logits, deltas])
    n_anchors = sum(h * w for h, w in sizes) * k
    assert tuple(logits.shape) == (None, n_anchors, 1) and tuple(deltas.shape) == (None, n_anchors, 4)
    # One set of weights for all three levels: 3x3 conv, 1x1 objectness, 1x1 deltas.
    shapes = sorted(tuple(w.shape) for w in model.trainable_weights)
    assert shapes == sorted([(3, 3, channels, 5), (5,), (1, 1, 5, k), (k,), (1, 1, 5, 4 * k), (4 * k,)])
    conv, cls, bbox = (model.get_layer(f"rpn_{n}") for n in ("conv", "class", "bbox"))
    for layer in (conv, cls, bbox):
        layer.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in layer.get_weights()])

    features = [rng.normal(size=(2, h, w, channels)).astype(np.float32) for h, w in sizes]
    got_logits, got_deltas = model.predict(features, verbose=0)  # compiled graph
    assert got_logits.dtype == np.float32 and got_logits.shape == (2, n_anchors, 1)
    ref_logits, ref_deltas = [], []
    for x in features:
        hidden = np.maximum(reference_conv_same(x, *conv.get_weights()), 0)
        ref_logits.append(reference_conv_same(hidden, *cls.get_weights()).reshape(2, -1, 1))
        ref_deltas.append(reference_conv_same(hidden, *bbox.get_weights()).reshape(2, -1, 4))
    np.testing.assert_allclose(got_logits, np.concatenate(ref_logits, axis=1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_deltas, np.concatenate(ref_deltas, axis=1), rtol=1e-4, atol=1e-4)
    # Rows line up with the anchors of the matching image size (8 px stride on a 64 px image).
    assert n_anchors == len(fpn_anchors((64, 64), strides=(8, 16, 32), scales=(16, 32, 64)))


def test_rpn_head_single_level_and_errors():
    logits, deltas = rpn_head([keras.Input((4, 4, 3))], anchors_per_location=2, name="p")
    assert tuple(logits.shape) == (None, 32, 1) and tuple(deltas.shape) == (None, 32, 4)
    with pytest.raises(ConfigError):
        rpn_head([keras.Input((4, 4, 3)), keras.Input((2, 2, 5))])
    with pytest.raises(ConfigError):
        rpn_head([])


# ----------------------------------------------------------------------------- targets

ANCHORS = fpn_anchors((64, 64), strides=(4, 8, 16), scales=(8, 16, 32))  # 1008 anchors


def sample_truth() -> np.ndarray:
    # Two boxes near anchors (IoU >= 0.7), a long thin one and a small one (forced matches only).
    near = ANCHORS[[800, 301]] + np.array([[0.01, -0.008, 0.012, 0.0], [0.003, 0.004, 0.0, -0.002]])
    odd = np.array([[0.6, 0.05, 0.7, 0.55], [0.8, 0.8, 0.86, 0.84]])
    return np.concatenate([near, odd]).astype(np.float32)


def test_rpn_targets_match_reference_without_sampling(monkeypatch):
    gt = sample_truth()
    labels, deltas = rpn_targets(gt, np.ones(len(gt), bool), ANCHORS, anchors_per_image=10_000,
                                 positive_fraction=1.0, rng=np.random.default_rng(0))
    monkeypatch.setattr(rpn, "_IOU_CHUNK", 50)  # the IoU in chunks of 12 anchors: same result
    chunked = rpn_targets(gt, np.ones(len(gt), bool), ANCHORS, anchors_per_image=10_000,
                          positive_fraction=1.0, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(chunked[0], labels)
    np.testing.assert_array_equal(chunked[1], deltas)
    with portable_kernels():  # the keras.ops encoding the NumPy one replaced: same to the last bit or so
        portable = rpn_targets(gt, np.ones(len(gt), bool), ANCHORS, anchors_per_image=10_000,
                               positive_fraction=1.0, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(portable[0], labels)
    np.testing.assert_allclose(portable[1], deltas, rtol=1e-6, atol=1e-7)
    assert labels.dtype == np.int8 and deltas.dtype == np.float32 and deltas.shape == (len(ANCHORS), 4)
    positive, negative, best = reference_labels(gt, ANCHORS)
    np.testing.assert_array_equal(labels == 1, positive)
    np.testing.assert_array_equal(labels == 0, negative)
    iou = reference_iou(ANCHORS, gt)
    assert (iou.max(1)[labels == 1] >= 0.7).any() and (iou.max(1)[labels == 1] < 0.7).any()
    assert (iou.max(1)[labels == 0] < 0.3).all()
    # Every truth has a positive anchor (its best), the odd-shaped one only through forcing.
    assert set(best[labels == 1]) == {0, 1, 2, 3}
    pos = labels == 1
    matched = gt[best[pos]]
    np.testing.assert_allclose(to_np(decode_boxes(deltas[pos], ANCHORS[pos])), matched, atol=1e-5)
    np.testing.assert_allclose(deltas[pos], to_np(encode_boxes(matched, ANCHORS[pos])), rtol=1e-5, atol=1e-5)
    assert (deltas[~pos] == 0).all()


def test_rpn_targets_sampling_limits_and_determinism():
    gt = sample_truth()
    positive, negative, _ = reference_labels(gt, ANCHORS)
    labels, deltas = rpn_targets(gt, [1, 1, 2, 1], ANCHORS, rng=np.random.default_rng(7))
    n_pos = min(positive.sum(), 128)
    assert (labels == 1).sum() == n_pos and (labels == 0).sum() == 256 - n_pos
    assert positive[labels == 1].all() and negative[labels == 0].all()
    assert (deltas[labels != 1] == 0).all()
    again, again_deltas = rpn_targets(gt, [1, 1, 2, 1], ANCHORS, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(labels, again)
    np.testing.assert_array_equal(deltas, again_deltas)
    other, _ = rpn_targets(gt, [1, 1, 2, 1], ANCHORS, rng=np.random.default_rng(8))
    assert not np.array_equal(labels, other)

    # Many truths equal to anchors: more than 128 positives are cut to 128 (and 128 negatives).
    crowd = ANCHORS[:768:4][:150]  # 150 of the smallest (8 px) anchors
    labels, deltas = rpn_targets(crowd, np.ones(len(crowd), bool), ANCHORS, rng=np.random.default_rng(1))
    positive, negative, best = reference_labels(crowd, ANCHORS)
    assert positive.sum() > 128 and negative.sum() > 128
    assert (labels == 1).sum() == 128 and (labels == 0).sum() == 128
    assert positive[labels == 1].all() and negative[labels == 0].all()
    pos = labels == 1
    np.testing.assert_allclose(to_np(decode_boxes(deltas[pos], ANCHORS[pos])), crowd[best[pos]], atol=1e-5)
    # A smaller budget and fraction: 10 positives at most, 40 anchors in all.
    labels, _ = rpn_targets(crowd, np.ones(len(crowd), bool), ANCHORS, anchors_per_image=40,
                            positive_fraction=0.25, rng=np.random.default_rng(1))
    assert (labels == 1).sum() == 10 and (labels == 0).sum() == 30


def test_rpn_targets_ties_are_all_positive():
    # One 16 px level on 64 px: a 16x16 truth straddling anchors 0 and 1 has IoU 1/3 with both.
    anchors = fpn_anchors((64, 64), strides=(16,), scales=(16,), ratios=(1,))
    gt = np.array([[0, 8, 16, 24]], np.float32) / 64
    labels, deltas = rpn_targets(gt, [1], anchors, anchors_per_image=100, positive_fraction=1.0,
                                 rng=np.random.default_rng(0))
    np.testing.assert_array_equal(labels, [1, 1] + [0] * 14)
    np.testing.assert_allclose(deltas[:2], [[0, 0.5 / 0.1, 0, 0], [0, -0.5 / 0.1, 0, 0]], atol=1e-6)


def test_rpn_targets_padding_rows_and_no_truth():
    gt = sample_truth()
    padded = np.concatenate([gt, ANCHORS[[100, 500]], np.zeros((3, 4), np.float32)])
    class_ids = np.array([1, 2, 1, 3, 0, 0, 0, 0, 0])
    expected = rpn_targets(gt, np.ones(4, bool), ANCHORS, rng=np.random.default_rng(3))
    for valid in (class_ids, class_ids > 0):
        got = rpn_targets(padded, valid, ANCHORS, rng=np.random.default_rng(3))
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])

    for boxes, valid in ((padded, np.zeros(9, int)), (np.zeros((0, 4)), np.zeros(0, bool))):
        labels, deltas = rpn_targets(boxes, valid, ANCHORS, rng=np.random.default_rng(0))
        assert (labels == 0).sum() == 256 and (labels == -1).sum() == len(ANCHORS) - 256
        assert not (labels == 1).any() and (deltas == 0).all()


@pytest.mark.parametrize("kwargs", [
    {"positive_iou": 0.3, "negative_iou": 0.5},
    {"anchors_per_image": 0},
    {"positive_fraction": 0.0},
])
def test_rpn_targets_rejects_bad_options(kwargs):
    with pytest.raises(ConfigError):
        rpn_targets(sample_truth(), np.ones(4, bool), ANCHORS, **kwargs)


# ----------------------------------------------------------------------------- proposals

PROPOSAL_ANCHORS = fpn_anchors((64, 64), strides=(8, 16), scales=(16, 32))  # 240 anchors


def proposal_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    n = len(PROPOSAL_ANCHORS)
    logits = rng.normal(0, 2, size=(2, n, 1)).astype(np.float32)
    deltas = rng.normal(0, 1, size=(2, n, 4)).astype(np.float32)
    # Three top-scoring anchors of image 0 decode far below the image: clipped to zero height, dropped.
    logits[0, :3, 0] = [10.0, 9.0, 8.0]
    deltas[0, :3, 0] = 100.0
    return logits, deltas


def test_proposal_layer_matches_reference():
    logits, deltas = proposal_inputs()
    for pre, post, nms_iou in ((60, 25, 0.5), (60, 80, 0.3), (1000, 40, 0.7)):
        layer = ProposalLayer(PROPOSAL_ANCHORS, pre_nms_top_k=pre, post_nms_top_k=post, nms_iou=nms_iou)
        got = to_np(layer(logits, deltas))
        assert got.shape == (2, post, 4)
        expected = reference_proposals(logits, deltas, PROPOSAL_ANCHORS, pre, post, nms_iou)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert ((got[..., 2] > got[..., 0]) | (got == 0).all(-1)).all()
    # post > pre: at most 60 proposals, the rest is zero padding.
    padded = to_np(ProposalLayer(PROPOSAL_ANCHORS, pre_nms_top_k=60, post_nms_top_k=80, nms_iou=0.3)(logits, deltas))
    count = (padded != 0).any(-1).sum(-1)
    assert (count <= 60).all() and (padded[0, count[0]:] == 0).all() and (padded[1, count[1]:] == 0).all()
    # The three degenerate top boxes never appear.
    assert not np.isclose(padded[0, :, 0], 1.0).any()


def test_proposal_layer_min_size_and_checks():
    logits, deltas = proposal_inputs(1)
    got = to_np(ProposalLayer(PROPOSAL_ANCHORS, 100, 30, 0.6, min_size=0.2)(logits, deltas))
    np.testing.assert_allclose(got, reference_proposals(logits, deltas, PROPOSAL_ANCHORS, 100, 30, 0.6, 0.2),
                               atol=1e-5)
    with pytest.raises(ValueError):
        ProposalLayer(PROPOSAL_ANCHORS[:10])(logits, deltas)
    for kwargs in ({"pre_nms_top_k": 0}, {"nms_iou": 0.0}, {"variances": (0.1, 0.1)}, {"min_size": -1}):
        with pytest.raises(ConfigError):
            ProposalLayer(PROPOSAL_ANCHORS, **kwargs)


def test_proposal_layer_in_a_compiled_model_and_saved(tmp_path):
    logits, deltas = proposal_inputs(2)
    n = len(PROPOSAL_ANCHORS)
    logit_in, delta_in = keras.Input((n, 1)), keras.Input((n, 4))
    layer = ProposalLayer(PROPOSAL_ANCHORS, pre_nms_top_k=80, post_nms_top_k=30, nms_iou=0.6, name="proposals")
    model = keras.Model([logit_in, delta_in], layer(logit_in, delta_in))
    assert tuple(model.outputs[0].shape) == (None, 30, 4) and not model.trainable_weights
    got = model.predict([logits, deltas], batch_size=2, verbose=0)
    np.testing.assert_allclose(got, reference_proposals(logits, deltas, PROPOSAL_ANCHORS, 80, 30, 0.6), atol=1e-5)

    path = tmp_path / "proposals.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    restored = loaded.get_layer("proposals")
    np.testing.assert_array_equal(restored.anchors, PROPOSAL_ANCHORS)
    assert (restored.pre_nms_top_k, restored.post_nms_top_k, restored.nms_iou) == (80, 30, 0.6)
    np.testing.assert_allclose(loaded.predict([logits, deltas], verbose=0), got, atol=1e-6)


@pytest.mark.jax
def test_rpn_head_and_proposals_under_jax_jit(tmp_path):
    pytest.importorskip("jax")
    logits, deltas = proposal_inputs(3)
    expected = reference_proposals(logits, deltas, PROPOSAL_ANCHORS, 60, 25, 0.5)
    np.savez(tmp_path / "case.npz", logits=logits, deltas=deltas, expected=expected)
    code = f"""
        import jax, keras, numpy as np
        from kseg.tasks.maskrcnn.rpn import ProposalLayer, fpn_anchors, rpn_head
        assert keras.backend.backend() == "jax"
        case = np.load({str(tmp_path / "case.npz")!r})
        anchors = fpn_anchors((64, 64), strides=(8, 16), scales=(16, 32))
        layer = ProposalLayer(anchors, pre_nms_top_k=60, post_nms_top_k=25, nms_iou=0.5)
        got = jax.jit(lambda l, d: layer(l, d))(case["logits"], case["deltas"])
        assert got.shape == (2, 25, 4)
        np.testing.assert_allclose(np.asarray(got), case["expected"], atol=1e-5)

        inputs = [keras.Input((8, 8, 4)), keras.Input((4, 4, 4))]
        model = keras.Model(inputs, list(rpn_head(inputs)))
        assert len(model.trainable_weights) == 6
        x = [np.ones((1, 8, 8, 4), np.float32), np.ones((1, 4, 4, 4), np.float32)]
        logits, deltas = model.predict(x, verbose=0)
        assert logits.shape == (1, 240, 1) and deltas.shape == (1, 240, 4)
        # Same weights on every level: the centre positions of both levels agree.
        np.testing.assert_allclose(logits[0, 3 * 27], logits[0, 192 + 3 * 5], rtol=1e-5)
        print("ok")
    """
    run_on_jax(code)
