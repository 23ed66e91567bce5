"""kseg.tasks.ssd.model: SSD300/512 shapes, default-box alignment, decoder, training graph, overfitting."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from backends import run_on_jax

from kseg.core.errors import ConfigError
from kseg.nn import box_ops
from kseg.tasks.ssd.losses import ssd_targets
from kseg.tasks.ssd.model import (
    DetectionDecoder,
    L2Normalization,
    ssd,
    ssd_default_boxes_for,
    ssd_feature_shapes,
    ssd_inference_model,
    ssd_training_model,
)

# ----------------------------------------------------------------------------- shapes


def test_ssd300_vgg16_shape_boxes_and_params():
    model = ssd((300, 300, 3), n_classes=21)
    assert model.output_shape == (None, 8732, 4 + 21)
    assert ssd_feature_shapes(300) == [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    assert ssd_default_boxes_for(300).shape == (8732, 4)
    assert 20e6 < model.count_params() < 32e6  # the paper's SSD300 (VOC): ~26.3M
    for name in ("block1_conv1", "block4_conv3", "block5_conv3", "conv4_3_norm", "fc6", "fc7"):
        model.get_layer(name)
    assert model.get_layer("fc6").dilation_rate == (6, 6)
    gamma = keras.ops.convert_to_numpy(model.get_layer("conv4_3_norm").gamma)
    assert gamma.shape == (512,) and np.all(gamma == 20.0)


def test_ssd512_layout():
    model = ssd((512, 512, 3), n_classes=3)
    assert ssd_feature_shapes(512) == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert model.output_shape == (None, 24564, 7)  # the paper's SSD512 box count
    assert len(ssd_default_boxes_for(512)) == 24564


@pytest.mark.parametrize("size, n_boxes", [(64, (64 + 16 + 4) * 4), (128, (256 + 64 + 16) * 4)])
def test_small_box_count_matches_model(size, n_boxes):
    model = ssd((size, size, 3), n_classes=3, backbone="small")
    assert ssd_feature_shapes(size, "small") == [(size // 8,) * 2, (size // 16,) * 2, (size // 32,) * 2]
    assert model.output_shape == (None, n_boxes, 7)
    assert len(ssd_default_boxes_for(size, "small")) == n_boxes
    assert 5_000 < model.count_params() < 100_000


def test_generic_vgg_size_and_custom_ratios_match_model():
    shapes = ssd_feature_shapes((64, 96))
    assert shapes == [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]  # H/8, H/16, then ceil halving to 1x1
    ratios = [(1.0,), (1.0, 2.0), (1.0, 0.5, 3.0), (1.0,), (2.0,)]
    model = ssd((64, 96, 3), n_classes=2, width=4, aspect_ratios=ratios)
    boxes = ssd_default_boxes_for((64, 96), aspect_ratios=ratios)
    assert model.output_shape == (None, len(boxes), 6)
    assert len(boxes) == 96 * 2 + 24 * 3 + 6 * 4 + 2 * 2 + 1 * 2
    with pytest.raises(ConfigError, match="aspect_ratios lists 4 maps"):
        ssd((64, 96, 3), width=4, aspect_ratios=ratios[:4])


@pytest.mark.parametrize("backbone, shape, expected", [
    ("vgg16", (301, 301, 3), r"300 \(SSD300\), 512 \(SSD512\).*multiples of 16.*288 or 304"),
    ("vgg16", (300, 512, 3), r"multiples of 16.*height 300: use 288 or 304"),
    ("small", (100, 64, 3), r"multiples of 32.*height 100: use 96 or 128"),
    ("small", (None, None, 3), r"fixed input height and width"),
])
def test_unsupported_input_size(backbone, shape, expected):
    with pytest.raises(ConfigError, match=expected):
        ssd(shape, backbone=backbone)
    if shape[0] is not None:
        with pytest.raises(ConfigError, match=expected):
            ssd_default_boxes_for(shape, backbone)


def test_bad_options():
    with pytest.raises(ConfigError, match="unknown SSD backbone"):
        ssd((64, 64, 3), backbone="resnet")
    with pytest.raises(ConfigError, match="n_classes"):
        ssd((64, 64, 3), n_classes=1, backbone="small")
    model = ssd((64, 64, 3), backbone="small")
    with pytest.raises(ConfigError, match="predicts 336 boxes"):
        ssd_inference_model(model, ssd_default_boxes_for(128, "small"))
    with pytest.raises(ConfigError, match="mining, focal"):
        ssd_training_model(model, ssd_default_boxes_for(64, "small"), loss="dice")


# ----------------------------------------------------------------------------- ordering


def test_head_rows_line_up_with_default_boxes():
    """Row n of the output is head (map m, row i, col j, box a), and default box n sits at (m, i, j, a).

    A non-square input (64 x 128) catches row/column swaps; the raw head convolutions are read
    from the model itself, so this checks the reshape/concatenate order, not a re-implementation.
    """
    size, n_classes = (64, 128), 3
    model = ssd((*size, 3), n_classes=n_classes, backbone="small")
    shapes = ssd_feature_shapes(size, "small")
    heads = keras.Model(model.input, [model.get_layer(f"head{m + 1}_{kind}").output
                                      for m in range(len(shapes)) for kind in ("offsets", "logits")])
    image = np.random.default_rng(0).random((1, *size, 3)).astype(np.float32)
    output = keras.ops.convert_to_numpy(model(image))[0]
    raw = [keras.ops.convert_to_numpy(t)[0] for t in heads(image)]

    scales = np.append(box_ops.ssd_scales(len(shapes)), 1.0)
    boxes = ssd_default_boxes_for(size, "small")
    unclipped = box_ops.default_boxes(shapes, size, aspect_ratios=(1.0, 2.0, 0.5), clip=False)
    np.testing.assert_allclose(boxes, np.clip(unclipped, 0, 1))
    centers = keras.ops.convert_to_numpy(box_ops.corners_to_center(unclipped))
    k = 4  # 3 ratios + the extra 1:1 box
    n = 0
    for m, (rows, cols) in enumerate(shapes):
        offsets, logits = raw[2 * m], raw[2 * m + 1]
        assert offsets.shape == (rows, cols, k * 4) and logits.shape == (rows, cols, k * n_classes)
        for i in range(rows):
            for j in range(cols):
                for a in range(k):
                    np.testing.assert_allclose(output[n, :4], offsets[i, j, 4 * a:4 * a + 4], atol=1e-5)
                    np.testing.assert_allclose(output[n, 4:], logits[i, j, n_classes * a:n_classes * (a + 1)],
                                               atol=1e-5)
                    expected_center = [(i + 0.5) / rows, (j + 0.5) / cols]
                    np.testing.assert_allclose(centers[n, :2], expected_center, atol=1e-6)
                    if a == 0:  # aspect ratio 1 at this map's scale
                        np.testing.assert_allclose(centers[n, 2:], [scales[m]] * 2, atol=1e-6)
                    n += 1
    assert n == len(boxes) == output.shape[0]


# ----------------------------------------------------------------------------- decoder


def test_decoder_zero_offsets_give_default_boxes_and_fixed_shapes():
    boxes = ssd_default_boxes_for(64, "small")
    n = len(boxes)
    predictions = np.zeros((2, n, 4 + 3), np.float32)
    predictions[..., 4] = 5.0  # background everywhere ...
    predictions[0, 10, 6] = 20.0  # ... except box 10 of image 0 (class 2) and box 200 of image 1 (class 1)
    predictions[1, 200, 5] = 20.0
    decoder = DetectionDecoder(boxes, max_output=7, score_threshold=0.5)
    out = {key: keras.ops.convert_to_numpy(v) for key, v in decoder(predictions).items()}
    assert out["boxes"].shape == (2, 7, 4) and out["scores"].shape == (2, 7)
    assert out["classes"].shape == (2, 7) and out["valid"].shape == (2,)
    assert out["valid"].tolist() == [1, 1]
    np.testing.assert_allclose(out["boxes"][0, 0], boxes[10], atol=1e-6)
    np.testing.assert_allclose(out["boxes"][1, 0], boxes[200], atol=1e-6)
    assert out["classes"][:, 0].tolist() == [2, 1] and np.all(out["scores"][:, 0] > 0.99)
    assert np.all(out["boxes"][:, 1:] == 0) and np.all(out["classes"][:, 1:] == 0)

    clone = DetectionDecoder.from_config(decoder.get_config())
    np.testing.assert_allclose(clone.default_boxes, boxes)
    assert clone.max_output == 7 and clone.score_threshold == 0.5


def test_inference_model_valid_range_and_save_load(tmp_path):
    for name, model, boxes in [
        ("small", ssd((64, 64, 3), 3, backbone="small"), ssd_default_boxes_for(64, "small")),
        ("vgg", ssd((64, 64, 3), 3, width=4), ssd_default_boxes_for(64)),  # L2Normalization too
    ]:
        inference = ssd_inference_model(model, boxes, max_output=20, score_threshold=0.0)
        images = np.random.default_rng(1).random((3, 64, 64, 3)).astype(np.float32)
        out = inference.predict(images, verbose=0)
        assert out["boxes"].shape == (3, 20, 4) and out["classes"].dtype == np.int32
        assert np.all((out["valid"] >= 0) & (out["valid"] <= 20))
        assert np.all((out["boxes"] >= 0) & (out["boxes"] <= 1))
        path = tmp_path / f"{name}.keras"
        inference.save(path)
        loaded = keras.saving.load_model(path)
        again = loaded.predict(images, verbose=0)
        for key in out:
            np.testing.assert_allclose(again[key], out[key], atol=1e-5, err_msg=f"{name} {key}")


def test_l2_normalization_layer():
    layer = L2Normalization(scale=20.0)
    x = np.array([[[[3.0, 4.0]]]], np.float32)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), [[[[12.0, 16.0]]]], rtol=1e-5)
    assert L2Normalization.from_config(layer.get_config()).scale == 20.0


# ----------------------------------------------------------------------------- training


def _squares_dataset(n_images=4, size=64, seed=0):
    """Dark noisy images with 1-3 non-overlapping bright squares (12-25 px); boxes of the squares."""
    rng = np.random.default_rng(seed)
    images, truths = [], []
    for i in range(n_images):
        image = 0.1 * rng.random((size, size, 3)).astype(np.float32)
        boxes = []
        while len(boxes) < 1 + i % 3:
            side = int(rng.integers(12, 26))
            y, x = (int(v) for v in rng.integers(0, size - side, 2))
            box = np.array([y, x, y + side, x + side], np.float32) / size
            if any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in boxes):
                continue
            boxes.append(box)
            image[y:y + side, x:x + side] = 1.0
        images.append(image)
        truths.append(np.stack(boxes))
    return np.stack(images), truths


def _targets(truths, default_boxes):
    pairs = [ssd_targets(t, np.ones(len(t), np.int32), default_boxes) for t in truths]
    return (np.stack([keras.ops.convert_to_numpy(o) for o, _ in pairs]),
            np.stack([keras.ops.convert_to_numpy(lab) for _, lab in pairs]))


def test_small_ssd_overfits_squares():
    keras.utils.set_random_seed(0)
    images, truths = _squares_dataset()
    model = ssd((64, 64, 3), n_classes=2, backbone="small")
    boxes = ssd_default_boxes_for(64, "small")
    offsets, labels = _targets(truths, boxes)
    assert np.all((labels > 0).sum(axis=1) >= [len(t) for t in truths])
    training = ssd_training_model(model, boxes, loss="mining")
    training.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = training.fit({"image": images, "target_offsets": offsets, "target_labels": labels},
                           epochs=200, batch_size=4, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0] / 50, (losses[0], losses[-1])

    inference = ssd_inference_model(model, boxes, max_output=10, score_threshold=0.5)
    out = inference.predict(images, verbose=0)
    for i, truth in enumerate(truths):
        assert out["valid"][i] == len(truth), (i, out["valid"][i], out["scores"][i])
        found = out["boxes"][i][: len(truth)]
        iou = keras.ops.convert_to_numpy(box_ops.pairwise_iou(truth, found))
        assert np.all(iou.max(axis=1) > 0.5), (i, iou)  # every truth found ...
        assert np.all(iou.max(axis=0) > 0.5), (i, iou)  # ... and every detection is a truth
        assert np.all(out["classes"][i][: len(truth)] == 1)


def test_focal_training_model_step():
    keras.utils.set_random_seed(1)
    images, truths = _squares_dataset(n_images=2, seed=3)
    model = ssd((64, 64, 3), n_classes=2, backbone="small")
    boxes = ssd_default_boxes_for(64, "small")
    offsets, labels = _targets(truths, boxes)
    training = ssd_training_model(model, boxes, loss="focal", gamma=2.0, alpha=0.25)
    assert training.get_layer("multibox_loss").get_config()["loss_kwargs"] == {"gamma": 2.0, "alpha": 0.25}
    training.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = training.fit({"image": images, "target_offsets": offsets, "target_labels": labels},
                           epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert len(training.trainable_weights) == len(model.trainable_weights)


@pytest.mark.jax
def test_small_ssd_trains_and_decodes_on_jax():
    run_on_jax("""
        import keras, numpy as np
        assert keras.backend.backend() == "jax"
        from kseg.tasks.ssd.losses import ssd_targets
        from kseg.tasks.ssd.model import ssd, ssd_default_boxes_for, ssd_inference_model, ssd_training_model
        model = ssd((64, 64, 3), n_classes=3, backbone="small")
        boxes = ssd_default_boxes_for(64, "small")
        rng = np.random.default_rng(0)
        images = rng.random((2, 64, 64, 3)).astype("float32")
        truth = np.array([[0.1, 0.1, 0.4, 0.5], [0.5, 0.6, 0.9, 0.9]], "float32")
        off, lab = ssd_targets(truth, np.array([1, 2], "int32"), boxes)
        x = {"image": images, "target_offsets": np.stack([np.asarray(off)] * 2),
             "target_labels": np.stack([np.asarray(lab)] * 2)}
        training = ssd_training_model(model, boxes)
        training.compile(optimizer="adam")
        history = training.fit(x, epochs=2, verbose=0)
        assert np.all(np.isfinite(history.history["loss"])), history.history
        out = ssd_inference_model(model, boxes, max_output=5).predict(images, verbose=0)
        assert out["boxes"].shape == (2, 5, 4) and out["valid"].shape == (2,)
        assert np.all((out["valid"] >= 0) & (out["valid"] <= 5))
        print("ok")
    """)
