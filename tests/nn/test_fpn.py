"""kseg.nn.fpn: pyramid shapes and strides, backbones, size errors, local weights, the
top-down pathway against a NumPy reference (compiled TF graph) and the same outputs on JAX."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from backends import run_on_jax

from kseg.core.errors import ConfigError
from kseg.nn.backbones import ENCODERS
from kseg.nn.fpn import (
    FPN_STRIDES,
    backbone_features,
    fpn_divisor,
    fpn_feature_shapes,
    fpn_preprocess,
    fpn_pyramid,
    resnet_fpn_features,
)

C_CHANNELS = (4, 6, 8, 10)  # C2..C5 channels of the pyramid-only tests


def fpn_model(size, **kwargs) -> keras.Model:
    image = keras.Input(shape=(*size, 3), name="image")
    return keras.Model(image, resnet_fpn_features(image, **kwargs))


def pyramid_model(rows: int, cols: int, fpn_channels: int = 5) -> keras.Model:
    """The pyramid alone on four inputs C2..C5 (C2 of size rows x cols)."""
    inputs = [keras.Input(shape=(rows >> i, cols >> i, c), name=f"c{i + 2}")
              for i, c in enumerate(C_CHANNELS)]
    return keras.Model(inputs, fpn_pyramid(inputs, fpn_channels=fpn_channels))


def randomise(model: keras.Model, seed: int = 0) -> None:
    """Random kernels and biases (biases start at zero, which would hide a missing add)."""
    rng = np.random.default_rng(seed)
    for v in model.trainable_weights:
        v.assign(rng.normal(0.0, 0.3, v.shape).astype("float32"))


def conv_same_reference(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """'same' cross-correlation with a (k, k, cin, cout) kernel, written as shifted matmuls."""
    k = kernel.shape[0]
    pad = k // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows, cols = x.shape[1:3]
    out = np.zeros((*x.shape[:3], kernel.shape[-1]))
    for di in range(k):
        for dj in range(k):
            out += padded[:, di:di + rows, dj:dj + cols, :] @ kernel[di, dj]
    return out + bias


# ----------------------------------------------------------------------------- shapes, options


@pytest.mark.parametrize("size", [(64, 64), (128, 192)])
def test_small_pyramid_shapes_and_strides(size):
    model = fpn_model(size, fpn_channels=32)
    h, w = size
    assert [tuple(p.shape) for p in model.outputs] == [
        (None, h // s, w // s, 32) for s in FPN_STRIDES]
    assert fpn_feature_shapes(size) == [(h // s, w // s) for s in FPN_STRIDES]
    encoder = model.get_layer("encoder")
    assert [tuple(c.shape) for c in encoder.outputs] == [
        (None, h // s, w // s, 8 * m) for s, m in zip((4, 8, 16, 32), (1, 2, 4, 8))]
    for name in ("fpn_c5p5", "fpn_p5upsampled", "fpn_p2add", "fpn_p2", "fpn_p6"):
        model.get_layer(name)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in encoder.layers)


def test_small_parameter_count_and_width():
    model = fpn_model((64, 64), fpn_channels=32)
    assert 100_000 <= model.count_params() <= 300_000
    # pyramid: four 3x3 convs 32 -> 32 and laterals from 8+16+32+64 channels, with biases
    pyramid = 4 * (9 * 32 * 32 + 32) + (8 + 16 + 32 + 64) * 32 + 4 * 32
    assert model.count_params() - model.get_layer("encoder").count_params() == pyramid
    wide = fpn_model((64, 64), width=16, fpn_channels=32, batch_norm=True)
    assert wide.get_layer("encoder").output[-1].shape[-1] == 128
    assert any(isinstance(layer, keras.layers.BatchNormalization)
               for layer in wide.get_layer("encoder").layers)


def test_resnet50_builds_with_weights_none():
    model = fpn_model((64, 64), backbone="resnet50", fpn_channels=16)
    assert [tuple(p.shape) for p in model.outputs] == [
        (None, 64 // s, 64 // s, 16) for s in FPN_STRIDES]
    features = backbone_features(keras.Input((64, 64, 3)), "resnet50")
    assert [tuple(c.shape) for c in features] == [
        (None, 16, 16, 256), (None, 8, 8, 512), (None, 4, 4, 1024), (None, 2, 2, 2048)]
    encoder = model.get_layer("encoder")
    assert encoder.outputs[1:] == [encoder.get_layer(name).output for name in (
        "conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out")]
    assert 23e6 < encoder.count_params() < 24e6  # ResNet-50 without the top: 23.6M


@pytest.mark.skipif("resnet101" not in ENCODERS,
                    reason="needs the 'resnet101' entry in kseg.nn.backbones.ENCODERS")
def test_resnet101_takes_c4_from_block23():
    model = fpn_model((64, 64), backbone="resnet101", fpn_channels=16)
    assert [tuple(p.shape) for p in model.outputs] == [
        (None, 64 // s, 64 // s, 16) for s in FPN_STRIDES]
    encoder = model.get_layer("encoder")
    assert encoder.outputs[3] is encoder.get_layer("conv4_block23_out").output
    assert 42e6 < encoder.count_params() < 43e6  # ResNet-101 without the top: 42.7M


def test_size_not_multiple_of_64_names_valid_sizes():
    assert fpn_divisor() == 64 and fpn_divisor(backbone="resnet50") == 64
    with pytest.raises(ConfigError, match="width 96 .*64.*; use 64 or 128"):
        fpn_model((128, 96))
    with pytest.raises(ConfigError, match="height 100 .*use 64 or 128"):
        fpn_model((100, 64), backbone="resnet50")
    with pytest.raises(ConfigError, match="use 64 or 128"):
        fpn_feature_shapes(96)
    with pytest.raises(ConfigError, match="use 192 or 256"):
        fpn_feature_shapes((256, 200, 3))


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown FPN backbone 'vgg16'.*resnet50"):
        fpn_model((64, 64), backbone="vgg16")
    with pytest.raises(ConfigError, match="'small' backbone only"):
        fpn_model((64, 64), backbone="resnet50", width=8)
    with pytest.raises(ConfigError, match="fpn_channels"):
        fpn_model((64, 64), fpn_channels=0)
    with pytest.raises(ConfigError, match="width"):
        fpn_model((64, 64), width=0)


def test_preprocess_maps_unit_floats_to_caffe_and_copies():
    rng = np.random.default_rng(1)
    images = rng.random((2, 4, 4, 3)).astype("float32")
    kept = images.copy()
    out = fpn_preprocess("resnet50")(images)
    expected = images[..., ::-1] * 255.0 - np.array([103.939, 116.779, 123.68])  # BGR means
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(images, kept)  # the caller's array is left alone
    assert fpn_preprocess("small")(images) is images


# ----------------------------------------------------------------------------- weights


def test_small_backbone_loads_local_weights(tmp_path):
    source = fpn_model((64, 64), fpn_channels=8)
    randomise(source.get_layer("encoder"), seed=3)
    path = tmp_path / "small_encoder.weights.h5"
    source.get_layer("encoder").save_weights(path)

    loaded = fpn_model((64, 64), fpn_channels=8, weights=path)
    for a, b in zip(source.get_layer("encoder").weights, loaded.get_layer("encoder").weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    x = np.random.default_rng(0).random((1, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(loaded.get_layer("encoder").predict(x, verbose=0)[-1],
                               source.get_layer("encoder").predict(x, verbose=0)[-1], atol=1e-6)

    with pytest.raises(ConfigError, match="could not load encoder weights"):
        fpn_model((64, 64), width=4, weights=path)
    with pytest.raises(ConfigError, match="does not exist"):
        fpn_model((64, 64), weights=tmp_path / "missing.weights.h5")


def test_saved_model_round_trip(tmp_path):
    model = fpn_model((64, 128), fpn_channels=8)
    randomise(model, seed=4)
    x = np.random.default_rng(2).random((1, 64, 128, 3)).astype("float32")
    path = tmp_path / "fpn.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    for a, b in zip(model.predict(x, verbose=0), reloaded.predict(x, verbose=0)):
        np.testing.assert_allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------- top-down pathway


def test_pyramid_matches_numpy_reference_in_compiled_graph():
    model = pyramid_model(16, 24)
    randomise(model, seed=5)
    rng = np.random.default_rng(6)
    cs = [rng.normal(size=(2, 16 >> i, 24 >> i, c)).astype("float32")
          for i, c in enumerate(C_CHANNELS)]
    got = model.predict(cs, verbose=0)  # runs as a compiled tf.function

    def weights(name):
        return [w.astype(np.float64) for w in model.get_layer(name).get_weights()]

    merged = {}
    for k in (5, 4, 3, 2):
        kernel, bias = weights(f"fpn_c{k}p{k}")
        lateral = cs[k - 2].astype(np.float64) @ kernel[0, 0] + bias
        if k < 5:  # nearest 2x upsampling of the coarser level, then add
            lateral = lateral + merged[k + 1].repeat(2, axis=1).repeat(2, axis=2)
        merged[k] = lateral
    expected = [conv_same_reference(merged[k], *weights(f"fpn_p{k}")) for k in (2, 3, 4, 5)]
    expected.append(expected[-1][:, ::2, ::2, :])
    assert [p.shape for p in got] == [e.shape for e in expected]
    assert got[-1].shape == (2, 1, 2, 5)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_top_down_connects_c5_to_p2():
    model = pyramid_model(16, 16)
    randomise(model, seed=7)
    rng = np.random.default_rng(8)
    cs = [tf.constant(rng.normal(size=(1, 16 >> i, 16 >> i, c)).astype("float32"))
          for i, c in enumerate(C_CHANNELS)]
    with tf.GradientTape() as tape:
        tape.watch(cs[3])
        p2_sum = tf.reduce_sum(model(cs)[0])
    grad = tape.gradient(p2_sum, cs[3]).numpy()
    assert grad.shape == (1, 2, 2, C_CHANNELS[3])
    assert np.all(np.abs(grad) > 1e-6)  # every C5 cell reaches P2 through the upsampling chain


# ----------------------------------------------------------------------------- JAX


@pytest.mark.jax
def test_same_outputs_under_jax(tmp_path):
    model = fpn_model((64, 128), fpn_channels=8)
    randomise(model, seed=9)
    x = np.random.default_rng(3).random((2, 64, 128, 3)).astype("float32")
    model.save_weights(tmp_path / "fpn.weights.h5")
    np.savez(tmp_path / "io.npz", x=x, *model.predict(x, verbose=0))
    run_on_jax(f"""
        import keras, numpy as np
        from kseg.nn.fpn import resnet_fpn_features
        image = keras.Input((64, 128, 3))
        model = keras.Model(image, resnet_fpn_features(image, fpn_channels=8))
        model.load_weights({str(tmp_path / "fpn.weights.h5")!r})
        data = np.load({str(tmp_path / "io.npz")!r})
        got = model.predict(data["x"], verbose=0)  # jax.jit
        for i, p in enumerate(got):
            want = data[f"arr_{{i}}"]  # random weights give large values: relative to the map
            np.testing.assert_allclose(p, want, atol=1e-5 * np.abs(want).max())
        print("ok")
    """)
