"""Encoders: keras.applications entries (features at their strides, the input scaling inside the
model against keras.applications' own preprocess_input) and keras-hub presets from a local folder
(tiny backbones saved with save_to_preset: weights, strides, converter, training, save/load, and
no network access for anything that is not a folder)."""

from __future__ import annotations

import json
import socket
import sys
import textwrap

import keras
import numpy as np
import pytest
from backends import run_on_jax
from hub_presets import MEAN, STD, tiny_resnet

from kseg.core.errors import ConfigError
from kseg.models import load_model
from kseg.nn.backbones import ENCODERS, build_encoder, encoder_max_depth, list_encoders
from kseg.nn.input_scaling import SCALINGS, ImageScaling
from kseg.nn.registry import build_model, input_divisor


def _images(n: int, size: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size, channels), dtype=np.float32)


def _np(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


# ----------------------------------------------------------------------------- input scaling


def test_image_scaling_matches_hand_computed_values():
    pixel = np.array([[[[0.2, 0.5, 1.0]]]], np.float32)  # R, G, B in [0, 1]
    caffe = _np(ImageScaling(**SCALINGS["caffe"])(pixel))[0, 0, 0]
    np.testing.assert_allclose(caffe, [255 - 103.939, 127.5 - 116.779, 51 - 123.68], rtol=1e-6)
    np.testing.assert_allclose(_np(ImageScaling(**SCALINGS["tf"])(pixel))[0, 0, 0], [-0.6, 0, 1], atol=1e-6)
    torch = _np(ImageScaling(**SCALINGS["torch"])(pixel))[0, 0, 0]
    np.testing.assert_allclose(torch, (pixel[0, 0, 0] - MEAN) / STD, rtol=1e-5)
    np.testing.assert_allclose(_np(ImageScaling(**SCALINGS["raw255"])(pixel))[0, 0, 0], [51, 127.5, 255])


@pytest.mark.parametrize("scaling, module", [("caffe", "resnet50"), ("caffe", "vgg16"), ("tf", "resnet_v2"),
                                             ("torch", "densenet"), ("raw255", "efficientnet"),
                                             ("raw255", "efficientnet_v2"), ("raw255", "convnext")])
def test_scaling_equals_keras_applications_preprocess_input(scaling, module):
    x = _images(2, 4, seed=1)
    expected = getattr(keras.applications, module).preprocess_input(255.0 * x.copy())
    np.testing.assert_allclose(_np(ImageScaling(**SCALINGS[scaling])(x)), expected, rtol=1e-5, atol=1e-4)


def test_image_scaling_serialises_and_computes_in_float32(restore_policy):
    keras.config.set_dtype_policy("mixed_float16")
    layer = ImageScaling(**SCALINGS["caffe"])
    assert layer.compute_dtype == "float32"
    clone = ImageScaling.from_config(json.loads(json.dumps(layer.get_config())))
    x = _images(1, 3)
    np.testing.assert_array_equal(_np(clone(x)), _np(layer(x)))


@pytest.fixture
def restore_policy():
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


# ----------------------------------------------------------------------------- applications


def test_every_entry_is_a_valid_data_entry():
    for name, spec in ENCODERS.items():
        assert spec.name == name
        assert callable(getattr(keras.applications, spec.constructor)), name
        assert callable(getattr(keras.applications, spec.preprocess_module).preprocess_input), name
        assert all(s & (s - 1) == 0 for s in spec.features), name
        assert spec.max_depth == 5 and encoder_max_depth(name) == 5
    assert {"resnet50", "resnet50v2", "efficientnetb0", "efficientnetv2b0", "convnext_tiny",
            "densenet121", "vgg16"} <= set(ENCODERS)
    assert list_encoders()[-1] == "keras_hub:<preset folder>"


def test_resnet50_encoder_normalises_inside_like_preprocess_input():
    """The scaled encoder on [0, 1] images equals the raw network on preprocess_input(255 x)."""
    scaled, strides = build_encoder("resnet50", (32, 32, 3))
    raw, _ = build_encoder("resnet50", (32, 32, 3), scale_inputs=False)
    raw.set_weights(scaled.get_weights())
    assert scaled.layers[1].name == "input_scaling" and "input_scaling" not in [l.name for l in raw.layers]
    assert scaled.count_params() == raw.count_params()
    x = _images(2, 32)
    caffe = x[..., ::-1] * 255.0 - np.array([103.939, 116.779, 123.68], np.float32)  # BGR means
    for a, b in zip(scaled(x), raw(caffe)):
        np.testing.assert_allclose(_np(a), _np(b), rtol=1e-4, atol=1e-3)
    assert strides == [2, 4, 8, 16, 32]


def test_per_channel_scaling_needs_rgb_and_depth_is_checked():
    with pytest.raises(ConfigError, match="normalises 3 colour channels .* input has 1"):
        build_encoder("densenet121", (32, 32, 1))
    with pytest.raises(ConfigError, match=r"supports depth 2\.\.5 .*got 1"):
        build_encoder("convnext_tiny", (32, 32, 3), depth=1)
    with pytest.raises(ConfigError, match="unknown encoder 'resnet18'.*keras_hub:<preset folder>"):
        build_encoder("resnet18", (32, 32, 3))
    full, _ = build_encoder("vgg16", (32, 32, 3))
    shallow, strides = build_encoder("vgg16", (32, 32, 3), depth=3)
    assert strides == [1, 2, 4, 8] and [t.shape[1] for t in shallow.outputs] == [32, 16, 8, 4]
    assert shallow.outputs[-1] is shallow.get_layer("block4_conv3").output
    assert shallow.count_params() < full.count_params()


def test_unet_on_convnext_has_no_stride_2_skip():
    model = build_model("unet", input_shape=(64, 64, 3), encoder="convnext_tiny", base_filters=2)
    encoder = model.get_layer("encoder")
    assert [t.shape[1] for t in encoder.outputs] == [16, 8, 4, 2]
    names = {layer.name for layer in model.layers}
    assert {"concat2", "concat3", "concat4"} <= names and not {"concat0", "concat1"} & names
    assert tuple(model.outputs[0].shape) == (None, 64, 64, 1)


def _one_entry_per_feature_table() -> list[str]:
    """Entries that share one feature table (EfficientNet B0-B7, EfficientNetV2 B1-B3, DenseNet
    121-201) name the same layers of one keras.applications family, each stage's first or last
    block, which every member has: the first of them stands for the rest (11 builds fewer)."""
    first: dict[tuple, str] = {}
    for name in sorted(ENCODERS):
        first.setdefault(tuple(sorted(ENCODERS[name].features.items())), name)
    return sorted(first.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", _one_entry_per_feature_table())
def test_entry_features_sit_at_their_strides(name):
    spec = ENCODERS[name]
    enc, strides = build_encoder(name, (64, 64, 3))
    assert strides == sorted(s for s in spec.features if s >= 1)
    for stride, out in zip(strides, enc.outputs):
        assert out.shape[1:3] == (64 // stride, 64 // stride), (name, stride)
        assert out is enc.get_layer(spec.features[stride]).output
    if spec.scaling == "raw255":  # the network must rescale 0..255 itself
        assert any(isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization))
                   for layer in enc.layers[2:6]), [layer.name for layer in enc.layers[:6]]


# ----------------------------------------------------------------------------- keras-hub presets


@pytest.mark.parametrize("family, strides, stride2_layer", [
    ("resnet", [2, 4, 8, 16, 32], "conv1_relu"),
    ("resnetv2", [2, 4, 8, 16, 32], "conv1_conv"),
    ("efficientnet", [2, 4, 8, 16, 32], "stem_activation"),  # the pyramid's own P1
    ("densenet", [2, 4, 8, 16, 32], "conv1_relu"),
    pytest.param("mit", [4, 8, 16, 32], None, marks=pytest.mark.slow),  # 4 s to build on 2 cores
    ("cspresnet", [2, 4, 8, 16, 32], "csp_stem_activation_0"),
    ("cspdarknet", [2, 4, 8, 16, 32], None),  # stage 0 itself sits at stride 2
])
def test_hub_families_give_features_at_measured_strides(presets, family, strides, stride2_layer):
    encoder, got = build_encoder(presets(family), (32, 32, 3))
    assert got == strides
    assert [tuple(t.shape[1:3]) for t in encoder.outputs] == [(32 // s, 32 // s) for s in strides]
    assert all(t.shape[-1] for t in encoder.outputs)  # MiT's 1 x 1 map at stride 32 too: convolutions need it
    features = encoder.layers[-1]
    if stride2_layer is not None:
        assert encoder.outputs[0].shape[1] == 16
        assert features.outputs[0] is features.get_layer(stride2_layer).output
    if family == "mit":  # its patch embeddings compute sizes when built
        with pytest.raises(ConfigError, match="fixed height and width"):
            build_encoder(presets(family), (None, None, 3))


def _backbone_in(encoder: keras.Model):
    """The keras-hub backbone nested in an encoder (its only nested model). Not by name: that
    depends on how many backbones of its class the process built before (``res_net_backbone_2``)."""
    (backbone,) = [layer for layer in encoder.layers if isinstance(layer, keras.Model)]
    return backbone


def test_hub_resnet_unet_weights_strides_converter(presets, keras_hub):
    name = presets("resnet")
    folder = name.removeprefix("keras_hub:")
    assert input_divisor("unet", encoder=name) == 32
    model = build_model("unet", input_shape=(64, 64, 3), encoder=name, base_filters=4)
    encoder = model.get_layer("encoder")
    features = _backbone_in(encoder)
    assert [t.shape[1] for t in encoder.outputs] == [32, 16, 8, 4, 2]

    reference = keras_hub.models.Backbone.from_preset(folder)
    np.testing.assert_array_equal(features.get_layer("conv1_conv").kernel.numpy(), np.float32(0.01))
    compared = 0
    for layer in reference.layers:
        for mine, theirs in zip(features.get_layer(layer.name).weights if layer.weights else [], layer.weights):
            np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
            compared += 1
    assert compared == len(reference.weights) == len(features.weights)

    # the converter (ImageNet mean/std on 0..255 pixels) is applied to the [0, 1] input
    x = _images(2, 64)
    normalised = (x - MEAN.astype(np.float32)) / STD.astype(np.float32)
    scaled = _np(encoder.get_layer("input_scaling")(x))
    np.testing.assert_allclose(scaled, normalised, rtol=1e-5, atol=1e-5)
    expected = keras.Model(reference.inputs[0], reference.pyramid_outputs["P5"])(normalised)
    np.testing.assert_allclose(_np(encoder(x)[-1]), _np(expected), rtol=1e-4, atol=1e-4)


def test_hub_unet_trains_one_step_and_reloads_identically(presets, keras_hub, tmp_path):
    model = build_model("unet", input_shape=(64, 64, 3), encoder=presets("resnet"), base_filters=4)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy", run_eagerly=True)
    x, y = _images(2, 64), (_images(2, 64, 1, seed=3) > 0.5).astype(np.float32)
    kernel = _backbone_in(model.get_layer("encoder")).get_layer("conv1_conv").kernel
    before = kernel.numpy().copy()
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss) and not np.array_equal(kernel.numpy(), before)

    predictions = _np(model(x, training=False))
    model.save(tmp_path / "hub.keras")
    loaded = load_model(tmp_path / "hub.keras")
    np.testing.assert_array_equal(_np(loaded(x, training=False)), predictions)
    assert loaded.get_layer("encoder").get_layer("input_scaling").get_config()["scale"] == pytest.approx(
        tuple(1 / STD))


def test_hub_preset_without_converter_gets_raw_pixels(presets, keras_hub):
    name = presets("efficientnet")
    encoder, strides = build_encoder(name, (32, 32, 3), depth=4)
    assert strides == [2, 4, 8, 16]
    reference = keras_hub.models.Backbone.from_preset(name.removeprefix("keras_hub:"))
    x = _images(1, 32)
    expected = keras.Model(reference.inputs[0], reference.pyramid_outputs["P4"])(255.0 * x)
    np.testing.assert_allclose(_np(encoder(x)[-1]), _np(expected), rtol=1e-4, atol=1e-4)


def test_hub_depth_and_options_are_checked(presets, keras_hub, tmp_path):
    shallow = tmp_path / "shallow"
    tiny_resnet(keras_hub, stacks=3).save_to_preset(str(shallow))  # deepest feature at stride 16
    with pytest.raises(ConfigError, match=r"strides \[2, 4, 8, 16\], so depth must be one of \[1, 2, 3, 4\]"):
        build_model("unet", input_shape=(64, 64, 3), encoder=f"keras_hub:{shallow}")
    model = build_model("unet", input_shape=(64, 64, 3), encoder=f"keras_hub:{shallow}", depth=4, base_filters=2)
    assert [t.shape[1] for t in model.get_layer("encoder").outputs] == [32, 16, 8, 4]
    with pytest.raises(ConfigError, match="carries its own weights"):
        build_encoder(presets("resnet"), (64, 64, 3), weights="w.h5")


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.mark.parametrize("preset, message", [
    ("resnet_50_imagenet", "not a folder on this machine"),
    ("kaggle://keras/resnetv1/keras/resnet_50_imagenet", "remote handle"),
    ("hf://keras/resnet_50_imagenet", "remote handle"),
    ("", "names no preset folder"),
])
def test_hub_presets_that_are_not_folders_fail_before_any_download(no_network, preset, message):
    with pytest.raises(ConfigError, match=message) as error:
        build_model("unet", input_shape=(64, 64, 3), encoder="keras_hub:" + preset)
    assert "download the preset first" in str(error.value) and "/kaggle/input/" in str(error.value)
    assert no_network == []


def test_hub_folder_checks_and_missing_package(no_network, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no config.json"):
        build_encoder(f"keras_hub:{tmp_path}", (64, 64, 3))
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # as if keras-hub were not installed
    with pytest.raises(ConfigError, match=r"needs keras-hub: pip install 'kseg\[hub\]'"):
        build_encoder(f"keras_hub:{tmp_path}", (64, 64, 3))
    assert no_network == []


@pytest.mark.jax
@pytest.mark.slow
def test_hub_checkpoint_loads_in_a_fresh_jax_process(presets, tmp_path):
    """A .keras file with keras-hub layers (EfficientNet's fused blocks) loads where keras_hub was
    never imported, on the other backend, and predicts the same."""
    pytest.importorskip("jax")
    model = build_model("unet", input_shape=(32, 32, 3), encoder=presets("efficientnet"), base_filters=2)
    x = _images(2, 32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", _np(model(x, training=False)))
    model.save(tmp_path / "m.keras")
    run_on_jax(textwrap.dedent(f"""
        import sys, numpy as np, keras
        from kseg.models import load_model
        assert keras.backend.backend() == "jax" and "keras_hub" not in sys.modules
        model = load_model({str(tmp_path / "m.keras")!r})
        x, y = np.load({str(tmp_path / "x.npy")!r}), np.load({str(tmp_path / "y.npy")!r})
        # another backend: float32 sums in another order
        np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x, training=False)), y, rtol=1e-4, atol=1e-4)
        print("ok")
    """))
