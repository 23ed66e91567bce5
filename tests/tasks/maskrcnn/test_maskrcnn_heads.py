"""Mask R-CNN heads, detection layer and mask pasting: head outputs against NumPy forward passes,
the detection layer against a textbook NumPy reference (softmax, best class, decode, clip, greedy
per-class NMS), on TensorFlow (eager and in a compiled model) and once on JAX under ``jax.jit``;
mask pasting on hand cases and a 200-instance memory check."""

from __future__ import annotations

import time
import tracemalloc

import keras
import numpy as np
import pytest
from backends import run_on_jax

from kseg.core.errors import ConfigError
from kseg.tasks.maskrcnn.heads import DetectionLayer, box_head, mask_head, paste_masks


def to_np(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def relu(x):
    return np.maximum(x, 0.0)


def weights(model, name):
    return [np.asarray(w, dtype=np.float64) for w in model.get_layer(name).get_weights()]


# ----------------------------------------------------------------------------- heads


def numpy_box_head(model, pooled):
    """The 2fc head written out: flatten, two ReLU Dense layers, class and box layers."""
    batch, rois = pooled.shape[:2]
    x = pooled.reshape(batch, rois, -1).astype(np.float64)
    for layer in ("box_head_fc1", "box_head_fc2"):
        kernel, bias = weights(model, layer)
        x = relu(x @ kernel + bias)
    kernel, bias = weights(model, "box_head_class_logits")
    logits = x @ kernel + bias
    kernel, bias = weights(model, "box_head_box_deltas")
    return logits, (x @ kernel + bias).reshape(batch, rois, -1, 4)


def numpy_conv3x3_same(x, kernel, bias):
    """(N, H, W, Cin) with a (3, 3, Cin, Cout) kernel, zero 'same' padding, stride 1."""
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    height, width = x.shape[1:3]
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
    for dy in range(3):
        for dx in range(3):
            out += padded[:, dy:dy + height, dx:dx + width] @ kernel[dy, dx]
    return out + bias


def numpy_mask_head(model, pooled, n_convs):
    """Every RoI on its own: convs, 2x2 stride-2 transposed conv (out[2i+a, 2j+b] = x[i, j] K[a, b])."""
    x = pooled.reshape(-1, *pooled.shape[2:]).astype(np.float64)
    for i in range(n_convs):
        x = relu(numpy_conv3x3_same(x, *weights(model, f"mask_head_conv{i + 1}")))
    kernel, bias = weights(model, "mask_head_deconv")  # (2, 2, out, in)
    n, height, width, _ = x.shape
    up = np.zeros((n, 2 * height, 2 * width, kernel.shape[2]))
    for a in range(2):
        for b in range(2):
            up[:, a::2, b::2] = x @ kernel[a, b].T
    up = relu(up + bias)
    kernel, bias = weights(model, "mask_head_logits")
    logits = up @ kernel[0, 0] + bias
    return logits.reshape(*pooled.shape[:2], *logits.shape[1:])


def test_box_head_shapes_values_and_dynamic_batch():
    pooled_in = keras.Input((5, 7, 7, 8))
    logits, deltas = box_head(pooled_in, n_classes=3, fc_channels=32)
    model = keras.Model(pooled_in, [logits, deltas])
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        pooled = rng.normal(size=(batch, 5, 7, 7, 8)).astype(np.float32)
        got_logits, got_deltas = model.predict(pooled, verbose=0)
        assert got_logits.shape == (batch, 5, 3) and got_deltas.shape == (batch, 5, 3, 4)
        assert got_logits.dtype == np.float32 and got_deltas.dtype == np.float32
        want_logits, want_deltas = numpy_box_head(model, pooled)
        np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got_deltas, want_deltas, rtol=1e-4, atol=1e-4)


def test_mask_head_shapes_values_and_dynamic_batch_and_rois():
    pooled_in = keras.Input((None, 14, 14, 8))  # dynamic RoI count too
    model = keras.Model(pooled_in, mask_head(pooled_in, n_classes=3, channels=8, n_convs=2))
    assert tuple(model.output.shape) == (None, None, 28, 28, 3)
    rng = np.random.default_rng(1)
    for batch, rois in ((1, 2), (2, 3)):
        pooled = rng.normal(size=(batch, rois, 14, 14, 8)).astype(np.float32)
        got = model.predict(pooled, verbose=0)
        assert got.shape == (batch, rois, 28, 28, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, numpy_mask_head(model, pooled, 2), rtol=1e-4, atol=1e-4)


def test_default_mask_head_layout():
    pooled_in = keras.Input((4, 14, 14, 8))
    out = mask_head(pooled_in, n_classes=2, channels=8)
    model = keras.Model(pooled_in, out)
    assert tuple(out.shape) == (None, 4, 28, 28, 2)
    assert [layer.name for layer in model.layers if "conv" in layer.name] == [
        f"mask_head_conv{i}" for i in range(1, 5)] + ["mask_head_deconv"]


def test_heads_reject_bad_options():
    with pytest.raises(ConfigError, match="n_classes"):
        box_head(keras.Input((4, 7, 7, 8)), n_classes=1)
    with pytest.raises(ConfigError, match="pooled"):
        mask_head(keras.Input((14, 14, 8)), n_classes=2)
    with pytest.raises(ConfigError, match="min_confidence"):
        DetectionLayer(min_confidence=1.5)
    with pytest.raises(ConfigError, match="max_detections"):
        DetectionLayer(max_detections=0)


def test_mask_head_model_saves_and_loads(tmp_path):
    pooled_in = keras.Input((3, 14, 14, 4))
    model = keras.Model(pooled_in, mask_head(pooled_in, n_classes=2, channels=4, n_convs=1))
    pooled = np.random.default_rng(2).normal(size=(2, 3, 14, 14, 4)).astype(np.float32)
    path = tmp_path / "mask_head.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    np.testing.assert_allclose(loaded.predict(pooled, verbose=0), model.predict(pooled, verbose=0),
                               atol=1e-6)


# ----------------------------------------------------------------------------- detection layer


def numpy_decode(roi, delta, variances=(0.1, 0.1, 0.2, 0.2)):
    height, width = roi[2] - roi[0], roi[3] - roi[1]
    cy, cx = roi[0] + 0.5 * height, roi[1] + 0.5 * width
    cy, cx = cy + delta[0] * variances[0] * height, cx + delta[1] * variances[1] * width
    height, width = height * np.exp(delta[2] * variances[2]), width * np.exp(delta[3] * variances[3])
    return np.array([cy - height / 2, cx - width / 2, cy + height / 2, cx + width / 2])


def numpy_iou(a, b):
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def numpy_detections(rois, logits, deltas, max_detections, min_confidence, nms_iou, drop_background=True):
    """Per image, the list of (score, class, box) detections, best first."""
    results = []
    for image_rois, image_logits, image_deltas in zip(rois, logits, deltas):
        exp = np.exp(image_logits - image_logits.max(-1, keepdims=True))
        probs = exp / exp.sum(-1, keepdims=True)
        candidates = []
        for r, roi in enumerate(image_rois.astype(np.float64)):
            if not roi.any():
                continue
            cls = 1 + int(np.argmax(probs[r, 1:]))
            score = probs[r, cls]
            if score < min_confidence or (drop_background and probs[r, 0] >= score):
                continue
            box = np.clip(numpy_decode(roi, image_deltas[r, cls]), 0.0, 1.0)
            candidates.append((score, cls, box))
        kept = []
        for cls in sorted({c for _, c, _ in candidates}):
            same = sorted((d for d in candidates if d[1] == cls), key=lambda d: -d[0])
            chosen = []
            for det in same:
                if all(numpy_iou(det[2], other[2]) <= nms_iou for other in chosen):
                    chosen.append(det)
            kept += chosen
        results.append(sorted(kept, key=lambda d: -d[0])[:max_detections])
    return results


def random_case(seed, batch=2, rois=16, n_classes=4, n_padding=3):
    """Clustered RoIs (so NMS has work), random logits and deltas; the last rows are padding
    whose logits strongly favour class 1 (they must still never be detected)."""
    rng = np.random.default_rng(seed)
    centres = rng.random((batch, 4, 2)) * 0.6 + 0.2
    pick = rng.integers(0, 4, size=(batch, rois))
    centre = np.take_along_axis(centres, pick[..., None], axis=1) + rng.normal(0, 0.02, (batch, rois, 2))
    half = 0.05 + rng.random((batch, rois, 2)) * 0.1
    boxes = np.clip(np.concatenate([centre - half, centre + half], -1), 0, 1).astype(np.float32)
    logits = (rng.normal(size=(batch, rois, n_classes)) * 2.5).astype(np.float32)
    deltas = (rng.normal(size=(batch, rois, n_classes, 4)) * 0.5).astype(np.float32)
    boxes[:, rois - n_padding:] = 0.0
    logits[:, rois - n_padding:] = 0.0
    logits[:, rois - n_padding:, 1] = 20.0
    return boxes, logits, deltas


def check_against_reference(out, expected, max_detections):
    out = {key: to_np(value) for key, value in out.items()}
    assert out["classes"].dtype == np.int32 and out["valid"].dtype == np.int32
    assert out["boxes"].shape == (len(expected), max_detections, 4)
    for b, dets in enumerate(expected):
        count = len(dets)
        assert out["valid"][b] == count
        np.testing.assert_allclose(out["scores"][b, :count], [d[0] for d in dets], rtol=1e-5)
        np.testing.assert_array_equal(out["classes"][b, :count], [d[1] for d in dets])
        np.testing.assert_allclose(out["boxes"][b, :count], np.array([d[2] for d in dets]).reshape(-1, 4),
                                   atol=1e-5)
        for key in ("boxes", "scores", "classes"):
            assert (out[key][b, count:] == 0).all()


@pytest.mark.parametrize("min_confidence, drop_background", [(0.3, True), (0.0, False), (0.6, True)])
def test_detection_layer_matches_numpy_reference(min_confidence, drop_background):
    rois, logits, deltas = random_case(seed=3)
    layer = DetectionLayer(max_detections=6, min_confidence=min_confidence, nms_iou=0.3,
                           drop_background_rois=drop_background)
    out = layer(rois, logits, deltas)
    expected = numpy_detections(rois, logits, deltas, 6, min_confidence, 0.3, drop_background)
    assert sum(len(d) for d in expected) > 2  # the case exercises detection, not just padding
    check_against_reference(out, expected, 6)
    scores, valid = to_np(out["scores"]), to_np(out["valid"])
    for b in range(len(valid)):
        assert (scores[b, :valid[b]] >= min_confidence).all()


def test_padding_rois_are_never_detected():
    rois, logits, deltas = random_case(seed=4, batch=1, rois=5, n_padding=5)  # all padding
    out = DetectionLayer(min_confidence=0.0, drop_background_rois=False)(rois, logits, deltas)
    assert to_np(out["valid"]).tolist() == [0]
    assert not to_np(out["scores"]).any() and not to_np(out["boxes"]).any()


def test_min_confidence_drops_everything_below_it():
    rois, _, deltas = random_case(seed=5, batch=1, rois=6, n_padding=0)
    logits = np.log(np.tile([[0.45, 0.35, 0.20]], (1, 6, 1))).astype(np.float32)
    layer_high = DetectionLayer(min_confidence=0.36, drop_background_rois=False)
    assert to_np(layer_high(rois, logits, deltas[..., :3, :])["valid"]).tolist() == [0]
    layer_low = DetectionLayer(min_confidence=0.34, drop_background_rois=False)
    out = layer_low(rois, logits, deltas[..., :3, :])
    assert to_np(out["valid"])[0] >= 1
    np.testing.assert_allclose(to_np(out["scores"])[0, :to_np(out["valid"])[0]], 0.35, rtol=1e-5)
    # The background is the most likely class here, so matterport's rule drops every RoI.
    layer_bg = DetectionLayer(min_confidence=0.34)
    assert to_np(layer_bg(rois, logits, deltas[..., :3, :])["valid"]).tolist() == [0]


def test_detection_layer_config_round_trip():
    layer = DetectionLayer(max_detections=7, min_confidence=0.25, nms_iou=0.4, pre_nms_top_k=50,
                           drop_background_rois=False, name="detections")
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(clone, DetectionLayer) and clone.get_config() == layer.get_config()
    assert not clone.trainable


def test_heads_and_detection_layer_in_a_compiled_model():
    rng = np.random.default_rng(6)
    n_rois, n_classes = 16, 4
    rois_in = keras.Input((n_rois, 4), name="rois")
    pooled_in = keras.Input((n_rois, 7, 7, 8), name="pooled")
    logits, deltas = box_head(pooled_in, n_classes=n_classes, fc_channels=32)
    detections = DetectionLayer(max_detections=6, min_confidence=0.3, name="detections")(rois_in, logits, deltas)
    model = keras.Model([rois_in, pooled_in], {"logits": logits, "deltas": deltas, **detections})
    rois, _, _ = random_case(seed=7, batch=3, rois=n_rois, n_classes=n_classes)
    pooled = (rng.normal(size=(3, n_rois, 7, 7, 8)) * 3).astype(np.float32)
    got = model.predict([rois, pooled], batch_size=3, verbose=0)
    expected = numpy_detections(rois, got["logits"], got["deltas"], 6, 0.3, 0.3)
    assert sum(len(d) for d in expected) > 0
    check_against_reference({k: got[k] for k in ("boxes", "scores", "classes", "valid")}, expected, 6)


@pytest.mark.jax
def test_heads_and_detection_layer_under_jax_jit():
    pytest.importorskip("jax")
    run_on_jax(
        """
        import jax, keras, numpy as np
        from kseg.tasks.maskrcnn.heads import DetectionLayer, box_head, mask_head
        assert keras.backend.backend() == "jax"

        rois = np.array([[[0, 0, .5, .5], [0, .05, .5, .55], [.5, .5, 1, 1], [0, 0, 0, 0]]], np.float32)
        logits = np.array([[[0, 3, 0], [0, 2.5, 0], [0, 0, 2], [0, 9, 0]]], np.float32)
        deltas = np.zeros((1, 4, 3, 4), np.float32)
        deltas[0, 2, 2] = [1, 0, 0, 0]  # class 2's delta moves RoI 2 down by 0.1 * height
        layer = DetectionLayer(max_detections=3, min_confidence=0.3, nms_iou=0.3)
        out = jax.jit(lambda r, l, d: layer(r, l, d))(rois, logits, deltas)
        probs = np.exp(logits[0]) / np.exp(logits[0]).sum(-1, keepdims=True)
        assert np.asarray(out["valid"]).tolist() == [2]  # RoI 1 suppressed, RoI 3 is padding
        assert np.asarray(out["classes"]).tolist() == [[1, 2, 0]]
        np.testing.assert_allclose(np.asarray(out["scores"])[0], [probs[0, 1], probs[2, 2], 0], rtol=1e-5)
        np.testing.assert_allclose(np.asarray(out["boxes"])[0],
                                   [[0, 0, .5, .5], [.55, .5, 1, 1], [0, 0, 0, 0]], atol=1e-6)

        pooled_in = keras.Input((5, 7, 7, 8))
        mask_in = keras.Input((5, 14, 14, 8))
        cls, box = box_head(pooled_in, 3, fc_channels=32)
        masks = mask_head(mask_in, 3, channels=8)
        model = keras.Model([pooled_in, mask_in], [cls, box, masks])
        rng = np.random.default_rng(0)
        got = model.predict([rng.normal(size=(2, 5, 7, 7, 8)), rng.normal(size=(2, 5, 14, 14, 8))], verbose=0)
        assert [g.shape for g in got] == [(2, 5, 3), (2, 5, 3, 4), (2, 5, 28, 28, 3)]
        print("ok")
        """
    )


# ----------------------------------------------------------------------------- paste_masks


def full_mask():
    return np.ones((28, 28), np.float32)


def test_paste_square_mask_lands_on_its_box_pixels():
    labels = paste_masks([[0.2, 0.3, 0.6, 0.7]], full_mask()[None], [0.9], (10, 10))
    expected = np.zeros((10, 10), np.int32)
    expected[2:6, 3:7] = 1
    np.testing.assert_array_equal(labels, expected)
    assert labels.dtype == np.int32

    # Left half of the mask: a 4-pixel-wide box samples mask columns 3, 10, 17, 24.
    half = np.zeros((28, 28), np.float32)
    half[:, :14] = 1.0
    labels = paste_masks([[0.2, 0.3, 0.6, 0.7]], half[None], [0.9], (10, 10))
    expected = np.zeros((10, 10), np.int32)
    expected[2:6, 3:5] = 1
    np.testing.assert_array_equal(labels, expected)


def test_paste_rounds_box_edges_to_pixel_centres():
    # y 2.1..5.9 -> rows 2..5 (centres 2.5..5.5); x 3.4..6.6 -> columns 3..6; on a 10 x 20 image
    # x is scaled by 20.
    labels = paste_masks([[0.21, 0.17, 0.59, 0.33]], full_mask()[None], [0.5], (10, 20))
    rows, cols = np.nonzero(labels)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (2, 5, 3, 6)
    assert np.count_nonzero(labels) == 16
    # A box between pixel centres still gets its one pixel.
    labels = paste_masks([[0.51, 0.51, 0.52, 0.52]], full_mask()[None], [0.5], (10, 10))
    assert np.argwhere(labels).tolist() == [[5, 5]]


def test_paste_higher_score_owns_the_overlap():
    boxes = [[0.0, 0.0, 0.6, 0.6], [0.4, 0.4, 1.0, 1.0]]
    masks = np.stack([full_mask(), full_mask()])
    for scores, owner in (([0.6, 0.9], 2), ([0.9, 0.6], 1)):
        labels = paste_masks(boxes, masks, scores, (10, 10))
        assert (labels[4:6, 4:6] == owner).all()
        assert (labels[:4, :4] == 1).all() and (labels[6:, 6:] == 2).all()
        assert np.count_nonzero(labels == 1) + np.count_nonzero(labels == 2) == 36 + 36 - 4


def test_paste_drops_empty_and_small_instances_and_renumbers():
    boxes = [[0.0, 0.0, 0.3, 0.3],   # kept
             [0.5, 0.5, 0.9, 0.9],   # mask below threshold: empty
             [0.0, 0.0, 0.2, 0.2],   # fully covered by row 0 (higher score)
             [0.5, 0.0, 1.0, 0.5],   # kept
             [0.9, 0.9, 1.0, 1.0]]   # 1 pixel: below min_size
    masks = np.stack([full_mask(), np.full((28, 28), 0.4, np.float32), full_mask(), full_mask(), full_mask()])
    scores = [0.9, 0.8, 0.7, 0.6, 0.95]
    labels, kept = paste_masks(boxes, masks, scores, (10, 10), min_size=2, return_indices=True)
    assert kept.tolist() == [0, 3]
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2]
    assert np.count_nonzero(labels == 1) == 9 and np.count_nonzero(labels == 2) == 25
    assert (labels[9, 9] == 0) and (labels[5:9, 5:9] == 0).all()
    # Without min_size the 1-pixel instance stays and becomes id 3 (input order).
    labels, kept = paste_masks(boxes, masks, scores, (10, 10), return_indices=True)
    assert kept.tolist() == [0, 3, 4] and labels[9, 9] == 3


def test_paste_no_instances():
    labels = paste_masks(np.zeros((0, 4)), np.zeros((0, 28, 28)), np.zeros(0), (6, 8))
    assert labels.shape == (6, 8) and not labels.any()


def test_paste_200_instances_without_k_by_image_memory():
    rng = np.random.default_rng(8)
    n, size = 200, 1024
    corner = rng.random((n, 2)) * 0.8
    boxes = np.concatenate([corner, corner + 0.02 + rng.random((n, 2)) * 0.18], axis=1)
    masks = rng.random((n, 28, 28)).astype(np.float32)
    scores = rng.random(n)
    tracemalloc.start()
    start = time.perf_counter()
    labels = paste_masks(boxes, masks, scores, (size, size))
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert labels.shape == (size, size) and labels.max() == len(np.unique(labels)) - 1 > 150
    assert peak < 0.1 * n * size * size, peak  # a K x H x W bool stack alone would be 200 MiB
    assert elapsed < 5.0
