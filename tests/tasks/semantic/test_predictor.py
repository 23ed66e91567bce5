"""Prediction: TTA inverses, tiling against whole-image prediction, bounded memory, geometry
(pad/resize/channels undone), ensembles and run loading. Models are one or two fixed Conv2D
layers, so expected outputs can be written down."""

from __future__ import annotations

import tracemalloc

import keras
import numpy as np
import pytest

from kseg.core.config import Config, load_config
from kseg.core.errors import ConfigError
from kseg.core.runs import run_config
from kseg.nn.predict import predict_image
from kseg.tasks.base import LoadedModel, load_run
from kseg.tasks.semantic.predictor import (
    TRANSFORMS,
    Predictor,
    predict_batch,
    predict_tiled,
    tile_starts,
    tta_transforms,
)


def conv_model(kernels, activation=None, bias=None):
    """Functional model of fixed Conv2D layers (kernels: kh x kw x in x out arrays)."""
    inputs = keras.Input((None, None, kernels[0].shape[2]), name="image")
    x = inputs
    for index, kernel in enumerate(kernels):
        last = index == len(kernels) - 1
        layer = keras.layers.Conv2D(kernel.shape[3], kernel.shape[:2], padding="same",
                                    activation=activation if last else "relu")
        x = layer(x)
        layer.set_weights([kernel.astype(np.float32),
                           np.zeros(kernel.shape[3], np.float32) if bias is None else bias[index]])
    return keras.Model(inputs, x)


def random_model(channels_in=1, channels_out=2, seed=0):
    rng = np.random.default_rng(seed)
    return conv_model([rng.normal(size=(3, 3, channels_in, 4)), 0.5 * rng.normal(size=(3, 3, 4, channels_out))],
                      activation="sigmoid")


def identity_model(channels=1, scale=1.0):
    return conv_model([np.eye(channels).reshape(1, 1, channels, channels) * scale])


def shift_right_model():
    """out[i, j] = x[i, j - 1] (zero in column 0): translation-equivariant, not flip-equivariant."""
    kernel = np.zeros((3, 3, 1, 1))
    kernel[1, 0] = 1.0
    return conv_model([kernel])


def shifted(x, direction):
    """x (B, H, W, C) moved one pixel towards ``direction``, zero-filled."""
    out = np.zeros_like(x)
    if direction == "right":
        out[:, :, 1:] = x[:, :, :-1]
    elif direction == "left":
        out[:, :, :-1] = x[:, :, 1:]
    elif direction == "down":
        out[:, 1:] = x[:, :-1]
    else:
        out[:, :-1] = x[:, 1:]
    return out


# -- predict_image -------------------------------------------------------------------------------
def test_predict_image_is_the_one_the_training_callbacks_use():
    from kseg.tasks.semantic import task as callbacks

    assert callbacks.predict_image is predict_image


def test_predict_image_pads_to_the_divisor_and_crops_back():
    image = np.random.default_rng(0).random((13, 21, 1)).astype(np.float32)
    out = predict_image(identity_model(), image, pad_multiple=8)
    assert out.shape == (13, 21, 1) and out.dtype == np.float32
    np.testing.assert_array_equal(out, image)


# -- TTA -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("pad_multiple", [1, 4])
def test_each_transform_is_undone(name, pad_multiple):
    # A non-square, asymmetric batch: any inverse that is off by a flip or a quarter turn (or
    # that crops the padding on the wrong side) gives another array.
    batch = np.random.default_rng(1).random((2, 6, 10, 1)).astype(np.float32)
    out = predict_batch(identity_model(), batch, pad_multiple, tta=(name,))
    np.testing.assert_array_equal(out, batch)


# Conjugating "shift right" by each element of D4 gives the shift in these directions, worked out
# by hand from where the transform sends a pixel (e.g. transpose swaps rows and columns, so the
# column shift becomes a row shift: down).
EXPECTED_SHIFT = {"identity": "right", "flip_h": "left", "flip_v": "right", "rot180": "left",
                  "rot90": "down", "transpose": "down", "rot270": "up", "transverse": "up"}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_a_non_equivariant_model_sees_each_transform_inverted(name):
    batch = np.random.default_rng(2).random((1, 7, 9, 1)).astype(np.float32)
    out = predict_batch(shift_right_model(), batch, 1, tta=(name,))
    np.testing.assert_allclose(out, shifted(batch, EXPECTED_SHIFT[name]), atol=1e-6)


def test_d4_averages_the_four_conjugate_shifts():
    batch = np.random.default_rng(3).random((1, 8, 8, 1)).astype(np.float32)
    out = predict_batch(shift_right_model(), batch, 1, tta=tta_transforms("d4"))
    expected = np.mean([shifted(batch, d) for d in ("right", "left", "down", "up")], axis=0)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_a_flip_equivariant_model_gives_the_same_result_with_and_without_tta():
    blur = np.outer([1, 2, 1], [1, 2, 1]).reshape(3, 3, 1, 1) / 16.0
    model = conv_model([blur * 8.0], activation="sigmoid")
    batch = np.random.default_rng(4).random((2, 12, 17, 1)).astype(np.float32)
    plain = predict_batch(model, batch, 1, tta=tta_transforms("none"))
    for preset in ("flips", "rotations", "d4"):
        np.testing.assert_allclose(predict_batch(model, batch, 1, tta=tta_transforms(preset)), plain, atol=1e-6)
    # ... and is not trivially so: the shift model does change under the same TTA.
    assert not np.allclose(predict_batch(shift_right_model(), batch, 1, tta=tta_transforms("flips")),
                           predict_batch(shift_right_model(), batch, 1, tta=tta_transforms("none")), atol=1e-3)


def test_tta_specs():
    assert tta_transforms("none") == ("identity",)
    assert tta_transforms(None) == ("identity",)
    assert tta_transforms("flips") == ("identity", "flip_h", "flip_v")
    assert len(tta_transforms("d4")) == 8
    assert tta_transforms(["identity", "rot90"]) == ("identity", "rot90")
    with pytest.raises(ConfigError, match="rot45"):
        tta_transforms(["rot45"])
    with pytest.raises(ConfigError, match="twice"):
        tta_transforms(["identity", "identity"])


# -- tiling --------------------------------------------------------------------------------------
def test_tiled_prediction_equals_whole_image_prediction_away_from_the_borders():
    model = random_model()
    image = np.random.default_rng(5).integers(0, 256, (300, 260, 1), dtype=np.uint8)
    rows, _ = tile_starts(300, 96, 24)
    cols, _ = tile_starts(260, 96, 24)
    assert rows.size > 2 and cols.size > 2, "the test must really tile"
    whole = predict_tiled(model, image, pad_multiple=8, tile_size=None)
    tiled = predict_tiled(model, image, pad_multiple=8, tile_size=96, overlap=24, batch_size=3)
    assert tiled.shape == whole.shape == (300, 260, 2)
    # Zero padding at the image edge differs (whole: to a multiple of 8; tiles: their own).
    np.testing.assert_allclose(tiled[4:-4, 4:-4], whole[4:-4, 4:-4], atol=1e-5)
    # The whole-image path scales uint8 exactly as the generator does.
    np.testing.assert_array_equal(whole, predict_image(model, image.astype(np.float32) * np.float32(1 / 255), 8))


def test_tiles_cover_the_image_with_the_requested_overlap():
    starts, extent = tile_starts(1000, 256, 64)
    assert starts[0] == 0 and starts[-1] + extent == 1000
    assert np.all(starts[:-1] + extent - starts[1:] >= 64)
    assert tile_starts(200, 256, 64)[0].tolist() == [0] and tile_starts(200, 256, 64)[1] == 200


def test_tiled_prediction_memory_is_bounded_by_the_output():
    """A 1500 x 1500 image: NumPy's peak stays under twice the float32 output (no float64 or
    full-size float copy of the input, no H x W weight array)."""
    model = random_model(channels_out=1)
    image = np.random.default_rng(6).integers(0, 256, (1500, 1500, 1), dtype=np.uint8)
    predict_tiled(model, image[:300, :300], 8, tile_size=256, overlap=32)  # build the model's kernels first
    tracemalloc.start()
    try:
        out = predict_tiled(model, image, 8, tile_size=256, overlap=32, tta=("identity", "flip_h"), batch_size=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (1500, 1500, 1) and out.dtype == np.float32
    assert peak < 2 * out.nbytes, f"peak {peak / 1e6:.1f} MB for a {out.nbytes / 1e6:.1f} MB output"


# -- geometry, ensembles, runs ---------------------------------------------------------------------
def member(model, preprocess, predict=None, divisor=1):
    cfg = Config({"preprocess": preprocess, "predict": predict or {"tta": "none", "tile_size": None}})
    return LoadedModel(run_dir=None, cfg=cfg, model=model, pad_multiple=divisor, checkpoint="best")


def test_pad_mode_is_cropped_back_to_the_original_pixels():
    image = np.random.default_rng(7).integers(0, 256, (101, 101, 1), dtype=np.uint8)
    predictor = Predictor([member(identity_model(), {"mode": "pad", "size": [128, 128], "channels": 1}, divisor=16)])
    out = predictor.predict(image)
    assert out.shape == (101, 101, 1)
    np.testing.assert_array_equal(out, image.astype(np.float32) * np.float32(1 / 255))


def test_resize_mode_maps_probabilities_back_to_the_original_size():
    y, x = np.mgrid[0:90, 0:70]
    image = ((np.sin(y / 9.0) + np.cos(x / 7.0) + 2) * 60).astype(np.uint8)[..., None].repeat(3, axis=2)
    predictor = Predictor([member(identity_model(1), {"mode": "resize", "size": [180, 140], "channels": 1})])
    out = predictor.predict(image)
    assert out.shape == (90, 70, 1)
    np.testing.assert_allclose(out[..., 0], image[..., 0] / 255, atol=0.02)


def test_an_ensemble_averages_its_members():
    image = np.random.default_rng(8).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    settings = {"mode": "none", "channels": 3}
    one = Predictor([member(identity_model(3), settings)]).predict(image)
    members = [member(identity_model(3), settings), member(identity_model(3, scale=0.5), settings)]
    both = Predictor(members).predict(image)
    np.testing.assert_allclose(both, 0.75 * one, rtol=1e-6)


def test_load_run_reads_the_checkpoint_and_fills_new_config_sections(tmp_path):
    cfg = load_config("demo", overrides=["model.args.depth=2", "postprocess.min_size=5"]).to_dict()
    del cfg["predict"], cfg["submission"]  # a run trained before these sections existed
    Config(cfg).dump(tmp_path / "config.yaml")
    model = random_model(channels_in=3)
    model.save(tmp_path / "last.keras")
    loaded = load_run(tmp_path)  # no best.keras: falls back to last
    assert loaded.checkpoint == "last" and loaded.pad_multiple == 4
    assert loaded.cfg.predict.tta == "flips" and loaded.cfg.submission.format == "dsb_instances"
    assert loaded.cfg.postprocess.min_size == 5  # the run's own values are kept
    batch = np.random.default_rng(9).random((1, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(predict_batch(loaded.model, batch), predict_batch(model, batch), atol=1e-6)
    assert run_config(tmp_path, ["predict.tta=d4"]).predict.tta == "d4"
