"""Model builders: every registered architecture through one contract test, plus U-Net / FCN
specifics (input-size checks, bilinear initialiser, encoders, a tiny overfit run)."""

from __future__ import annotations

import textwrap

import keras
import numpy as np
import pytest
from backends import run_on_jax

from kseg.core.errors import ConfigError
from kseg.nn.backbones import encoder_preprocess, load_encoder_weights
from kseg.nn.blocks import (
    BilinearUpsampleInitializer,
    ImageStandardization,
    bilinear_kernel,
    check_input_size,
    nearest_valid_sizes,
)
from kseg.nn.registry import build_model, get_model_entry, input_divisor, list_models
from kseg.tasks.semantic.heads import output_channels, resolve_head
from kseg.tasks.semantic.targets import target_channels

TINY_FCN = dict(width=2, convs_per_block=(1, 1, 1, 1, 1), fc_width=8, fc_kernel=3)
TINY_UNET = dict(depth=2, base_filters=4)
TINY_FPN = dict(base_filters=1, pyramid_filters=8, segmentation_filters=4)
TINY_DEEPLAB = dict(base_filters=1, aspp_filters=8, low_level_filters=4, decoder_filters=8, atrous_rates=(1, 2, 3))

# (registered name, tiny options, input size). Every semantic model must appear at least once.
CASES = [
    ("unet", dict(TINY_UNET), 32),
    ("unet", dict(TINY_UNET, residual=True, upsampling="bilinear", dropout=0.2,
                  targets="mask+border"), 32),
    ("unet", dict(TINY_UNET, n_classes=3, batch_norm=False), 32),
    ("unet", dict(TINY_UNET, activation=None), 32),
    ("unet", dict(TINY_UNET, attention="scse", hypercolumns=True), 32),
    ("unetpp", dict(TINY_UNET), 32),
    ("unetpp", dict(TINY_UNET, attention="scse_max", hypercolumns=True, upsampling="bilinear",
                    dropout=0.2, targets="mask+border"), 32),
    ("linknet", dict(TINY_UNET, attention="scse", hypercolumns=True), 32),
    ("linknet", dict(TINY_UNET, residual=True, n_classes=3), 32),
    ("fpn", dict(TINY_FPN), 32),
    ("fpn", dict(TINY_FPN, merge="concat", attention="scse", activation=None), 64),
    ("deeplabv3plus", dict(TINY_DEEPLAB), 32),
    ("deeplabv3plus", dict(TINY_DEEPLAB, attention="scse", n_classes=3, batch_norm=False), 32),
    ("fcn", dict(TINY_FCN, n_classes=3), 64),
    ("fcn8s", dict(TINY_FCN), 32),
    ("fcn16s", dict(TINY_FCN, dropout=0.0), 32),
    ("fcn32s", dict(TINY_FCN), 32),
]


def _case_id(case):
    name, kwargs, size = case
    extra = "-".join(f"{k}={v}" for k, v in kwargs.items()
                     if k not in TINY_UNET | TINY_FCN | TINY_FPN | TINY_DEEPLAB)
    return f"{name}[{extra}]" if extra else name


def _images(n: int, size: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size, channels), dtype=np.float32)


def _perturb(model: keras.Model, seed: int = 0) -> None:
    """Randomise trainable weights so zero-initialised layers (FCN scores) carry signal."""
    rng = np.random.default_rng(seed)
    for v in model.trainable_weights:
        v.assign(v.numpy() + rng.normal(0.0, 0.1, v.shape).astype(v.dtype))


@pytest.fixture
def restore_policy():
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


# ----------------------------------------------------------------------------- registry


def test_registry_lists_builtin_models():
    assert {"unet", "fcn", "fcn8s", "fcn16s", "fcn32s"} <= set(list_models())
    assert set(list_models(task="semantic")) >= {"unet", "fcn8s"}


def test_every_semantic_model_has_a_tiny_case():
    """Every built-in one: other test modules register their own test models, imported with the suite."""
    covered = {name for name, _, _ in CASES}
    builtin = {name for name in list_models(task="semantic")
               if get_model_entry(name).builder.__module__.startswith("kseg.")}
    missing = sorted(builtin - covered)
    assert not missing, f"add a tiny configuration to CASES for {missing}"


def test_unknown_model_and_option_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'unet'"):
        build_model("unte")
    with pytest.raises(ConfigError, match="no option 'dpeth' \\(did you mean 'depth'\\?\\)"):
        build_model("unet", dpeth=3)
    with pytest.raises(ConfigError, match="no option 'variant'"):
        build_model("fcn8s", variant="32s")


def test_input_divisor():
    assert input_divisor("unet") == 16
    assert input_divisor("unet", depth=2) == 4
    assert input_divisor("unet", encoder="resnet50") == 32
    assert input_divisor("fcn8s", width=2) == 32


# ----------------------------------------------------------------------------- shared contract


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_model_contract(case, tmp_path):
    name, kwargs, size = case
    model = build_model(name, input_shape=(size, size, 3), **kwargs)
    n_out, activation = resolve_head(kwargs.get("n_classes"), kwargs.get("targets"),
                                     kwargs.get("activation", "auto"))
    assert len(model.inputs) == 1 and len(model.outputs) == 1
    assert model.inputs[0].shape[1:] == (size, size, 3)
    assert model.get_layer("logits").output.dtype == "float32"
    assert model.count_params() < 25_000, "tiny test configs must stay tiny"  # FPN's 5-level encoder: 23k

    _perturb(model)
    x = _images(2, size)
    y = keras.ops.convert_to_numpy(model(x, training=False))
    assert y.shape == (2, size, size, n_out)
    assert y.dtype == np.float32
    assert np.isfinite(y).all()
    if activation == "sigmoid":
        assert model.layers[-1].name == "probs"
        assert (y >= 0).all() and (y <= 1).all()
    elif activation == "softmax":
        np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)
    else:
        assert model.layers[-1].name == "logits"
        assert y.min() < 0 or y.max() > 1 or np.ptp(y) > 0

    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x, training=False)), y)


@pytest.mark.parametrize("name,kwargs", [("unet", TINY_UNET), ("fcn8s", TINY_FCN)])
def test_one_eager_training_step_changes_weights(name, kwargs):
    model = build_model(name, input_shape=(32, 32, 3), **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy",
                  run_eagerly=True)
    before = [w.numpy().copy() for w in model.trainable_weights]
    y = (_images(2, 32, 1, seed=1) > 0.5).astype(np.float32)
    loss = model.train_on_batch(_images(2, 32), y)
    assert np.isfinite(loss)
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights)]
    assert any(changed)


def test_mixed_precision_keeps_float32_output(restore_policy):
    keras.config.set_dtype_policy("mixed_float16")
    for name, kwargs in [("unet", TINY_UNET), ("fcn8s", TINY_FCN)]:
        model = build_model(name, input_shape=(32, 32, 3), **kwargs)
        assert model.get_layer("head" if name == "unet" else "score_fr").compute_dtype == "float16"
        y = model(_images(1, 32), training=False)
        assert keras.ops.convert_to_numpy(y).dtype == np.float32
        assert model.get_layer("logits").output.dtype == "float32"


# ----------------------------------------------------------------------------- U-Net


def test_unet_layer_names_expose_skips():
    model = build_model("unet", input_shape=(32, 32, 3), **TINY_UNET)
    for i in range(2):
        skip = model.get_layer(f"enc{i}_out").output
        assert skip.shape[1] == 32 // 2**i
        assert model.get_layer(f"concat{i}").output.shape[-1] == 2 * 4 * 2**i
    assert model.get_layer("bottleneck_out").output.shape[1:] == (8, 8, 16)


def test_unet_divisibility_error_names_nearest_sizes():
    with pytest.raises(ConfigError, match=r"height 100 is not divisible by 2\*\*4=16; use 96 or 112"):
        build_model("unet", input_shape=(100, 64, 3))
    with pytest.raises(ConfigError, match=r"width 50 is not divisible by 2\*\*2=4; use 48 or 52"):
        build_model("unet", input_shape=(None, 50, 3), **TINY_UNET)
    with pytest.raises(ConfigError, match=r"height 40 is not divisible by 2\*\*5=32; use 32 or 64"):
        build_model("fcn8s", input_shape=(40, 64, 3), **TINY_FCN)


def test_check_input_size_helper():
    check_input_size(None, None, 16)
    check_input_size(96, None, 16)
    with pytest.raises(ConfigError, match="height 10 is not divisible by 2\\*\\*4=16; use 16"):
        check_input_size(10, 32, 16)
    with pytest.raises(ConfigError, match="height 33.*; width 17") as err:
        check_input_size(33, 17, 16)
    assert "use 32 or 48" in str(err.value) and "use 16 or 32" in str(err.value)
    with pytest.raises(ConfigError, match="divisible by 12; use 96 or 108"):
        check_input_size(100, 96, 12)
    assert nearest_valid_sizes(100, 16) == (96, 112)
    assert nearest_valid_sizes(64, 16) == (64,)


def test_unet_dynamic_input_runs_at_32_and_64():
    model = build_model("unet", input_shape=(None, None, 1), **TINY_UNET)
    for size in (32, 64):
        y = model(_images(1, size, channels=1), training=False)
        assert tuple(y.shape) == (1, size, size, 1)
    wide = model(np.zeros((1, 32, 64, 1), np.float32), training=False)
    assert tuple(wide.shape) == (1, 32, 64, 1)


def test_output_channels_and_head_conventions():
    assert output_channels("mask") == 1
    assert output_channels("mask+border") == 2
    assert output_channels("mask+center") == 2
    assert target_channels("mask+border+center") == ["mask", "border", "center"]
    assert resolve_head(None, None) == (1, "sigmoid")
    assert resolve_head(4, None) == (4, "softmax")
    assert resolve_head(None, "mask+border") == (2, "sigmoid")
    assert resolve_head(2, None, None) == (2, None)
    with pytest.raises(ConfigError, match="unknown target 'edge'"):
        output_channels("mask+edge")
    with pytest.raises(ConfigError, match="disagrees"):
        resolve_head(3, "mask+border")
    with pytest.raises(ConfigError, match="softmax over a single channel"):
        resolve_head(1, None, "softmax")


# ----------------------------------------------------------------------------- bilinear / FCN


def test_bilinear_kernel_matches_hand_computed_profile():
    k = bilinear_kernel(4, 2)
    profile = np.array([0.25, 0.75, 0.75, 0.25], np.float32)
    assert k.shape == (4, 4, 2, 2)
    np.testing.assert_allclose(k[:, :, 0, 0], np.outer(profile, profile))
    np.testing.assert_allclose(k[:, :, 1, 1], np.outer(profile, profile))
    assert not k[:, :, 0, 1].any() and not k[:, :, 1, 0].any()
    np.testing.assert_allclose(bilinear_kernel(3, 1)[:, 1, 0, 0], [0.5, 1.0, 0.5])


@pytest.mark.parametrize("stride", [2, 8])
def test_bilinear_transposed_conv_keeps_constant_interior(stride):
    layer = keras.layers.Conv2DTranspose(2, 2 * stride, strides=stride, padding="same",
                                         use_bias=False,
                                         kernel_initializer=BilinearUpsampleInitializer())
    x = np.full((1, 6, 6, 2), 3.0, np.float32)
    x[..., 1] = -2.0
    y = keras.ops.convert_to_numpy(layer(x))
    assert y.shape == (1, 6 * stride, 6 * stride, 2)
    inner = slice(stride, -stride)
    np.testing.assert_allclose(y[0, inner, inner, 0], 3.0, rtol=1e-6)
    np.testing.assert_allclose(y[0, inner, inner, 1], -2.0, rtol=1e-6)


def test_bilinear_transposed_conv_interpolates_a_ramp():
    """Half-pixel-aligned bilinear: input pixel i sits at output coordinate (i + 0.5) * 2 - 0.5."""
    layer = keras.layers.Conv2DTranspose(1, 4, strides=2, padding="same", use_bias=False,
                                         kernel_initializer=BilinearUpsampleInitializer())
    ramp = np.tile(np.arange(8, dtype=np.float32), (8, 1))[None, :, :, None]
    y = keras.ops.convert_to_numpy(layer(ramp))[0, 4, 2:-2, 0]
    expected = (np.arange(2, 14) + 0.5) / 2 - 0.5
    np.testing.assert_allclose(y, expected, atol=1e-6)


def test_bilinear_initializer_serialises():
    config = keras.initializers.serialize(BilinearUpsampleInitializer())
    assert isinstance(keras.initializers.deserialize(config), BilinearUpsampleInitializer)
    with pytest.raises(ValueError, match="filters equal"):
        BilinearUpsampleInitializer()((4, 4, 2, 3))


def test_fcn_upsampling_layers_start_bilinear_and_final_one_is_fixed():
    model = build_model("fcn8s", input_shape=(32, 32, 3), n_classes=2, **TINY_FCN)
    for name, k in [("upscore2", 4), ("upscore_pool4", 4), ("upscore8", 16)]:
        layer = model.get_layer(name)
        np.testing.assert_allclose(layer.kernel.numpy(), bilinear_kernel(k, 2))
    assert not model.get_layer("upscore8").trainable
    assert model.get_layer("upscore2").trainable
    assert model.get_layer("fuse_pool3").output.shape[1:3] == (4, 4)
    # zero-initialised score layers: the untrained model predicts logits 0 everywhere
    y = model(_images(1, 32), training=False)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(y), 0.5)


# ----------------------------------------------------------------------------- encoders


def test_encoder_preprocess_functions():
    x = np.full((1, 2, 2, 3), 128.0, np.float32)
    np.testing.assert_array_equal(encoder_preprocess("efficientnetb0")(x.copy()), x)
    np.testing.assert_allclose(encoder_preprocess("resnet50")(x.copy())[0, 0, 0],
                               [128 - 103.939, 128 - 116.779, 128 - 123.68], rtol=1e-5)
    with pytest.raises(ConfigError, match="unknown encoder 'resnet18'"):
        build_model("unet", encoder="resnet18")
    with pytest.raises(ConfigError, match="needs an encoder"):
        build_model("unet", encoder_weights="w.h5")


# Every encoder's features at their strides: tests/nn/test_encoders.py.


def test_unet_resnet50_encoder_builds_and_loads_local_weights(tmp_path):
    source = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    conv = source.get_layer("conv1_conv")
    conv.kernel.assign(np.full(conv.kernel.shape, 0.01, np.float32))
    path = tmp_path / "resnet50_notop.weights.h5"
    source.save_weights(path)

    model = build_model("unet", input_shape=(64, 64, 3), encoder="resnet50", encoder_weights=path,
                        base_filters=4)
    encoder = model.get_layer("encoder")
    np.testing.assert_array_equal(encoder.get_layer("conv1_conv").kernel.numpy(), np.float32(0.01))
    assert [t.shape[1] for t in encoder.outputs] == [32, 16, 8, 4, 2]
    assert encoder.layers[1].name == "input_scaling"  # it takes the [0, 1] images kseg feeds
    y = model(_images(1, 64), training=False)
    assert tuple(y.shape) == (1, 64, 64, 1)
    with pytest.raises(ConfigError, match="does not exist"):
        build_model("unet", input_shape=(64, 64, 3), encoder="resnet50",
                    encoder_weights=tmp_path / "missing.h5")


@pytest.mark.slow
def test_efficientnet_imagenet_style_normalisation_is_squared(tmp_path):
    """ImageNet files store std as the Normalization variance; loading yields (x - mean) / std."""
    source = keras.applications.EfficientNetB0(include_top=False, weights=None,
                                               input_shape=(32, 32, 3))
    norm = next(l for l in source.layers if isinstance(l, keras.layers.Normalization))
    norm.adapt_mean.assign([0.485, 0.456, 0.406])
    norm.adapt_variance.assign([0.229, 0.224, 0.225])
    path = tmp_path / "effb0.weights.h5"
    source.save_weights(path)
    target = keras.applications.EfficientNetB0(include_top=False, weights=None,
                                               input_shape=(32, 32, 3))
    load_encoder_weights(target, path)
    norm = next(l for l in target.layers if isinstance(l, keras.layers.Normalization))
    np.testing.assert_allclose(norm.adapt_variance.numpy(), np.square([0.229, 0.224, 0.225]),
                               rtol=1e-6)
    out = keras.ops.convert_to_numpy(norm(np.full((1, 1, 1, 3), 0.485, np.float32)))
    np.testing.assert_allclose(out[0, 0, 0, 0], 0.0, atol=1e-6)


@pytest.mark.slow
def test_fcn_copies_vgg16_weights_by_name(tmp_path):
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16_notop.weights.h5"
    source.save_weights(path)
    model = build_model("fcn32s", input_shape=(32, 32, 3), fc_width=4, fc_kernel=1,
                        encoder_weights=path)
    for name in ("block1_conv1", "block5_conv3"):
        for a, b in zip(model.get_layer(name).get_weights(), source.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="width=64"):
        build_model("fcn32s", input_shape=(32, 32, 3), width=2, fc_width=4, encoder_weights=path)


# ----------------------------------------------------------------------------- end to end


def _disk_data(n: int = 4, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((n, size, size, 1), np.float32)
    masks = np.zeros((n, size, size, 1), np.float32)
    for i in range(n):
        for _ in range(2):
            cy, cx = rng.integers(6, size - 6, 2)
            r = rng.integers(3, 7)
            masks[i, ..., 0] = np.maximum(masks[i, ..., 0], (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
        images[i] = 0.2 + 0.6 * masks[i] + rng.normal(0, 0.05, (size, size, 1))
    return images, masks


@pytest.mark.slow
def test_tiny_unet_overfits_four_images():
    keras.utils.set_random_seed(0)
    images, masks = _disk_data()
    model = build_model("unet", input_shape=(32, 32, 1), depth=2, base_filters=8)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy",
                  jit_compile=False)
    # 4 images repeated: 50 steps of batch 4 per epoch, 4 epochs = 200 Adam steps
    x, y = np.repeat(images, 50, axis=0), np.repeat(masks, 50, axis=0)
    model.fit(x, y, batch_size=4, epochs=4, shuffle=True, verbose=0)
    pred = keras.ops.convert_to_numpy(model(images, training=False)) > 0.5
    truth = masks > 0.5
    accuracy = (pred == truth).mean()
    iou = (pred & truth).sum() / (pred | truth).sum()
    assert accuracy > 0.97 and iou > 0.9, (accuracy, iou)


def test_image_standardization_layer_and_option(tmp_path):
    rng = np.random.default_rng(1)
    # Two images of very different exposure; after the layer each channel has mean 0 and std 1.
    images = np.stack([rng.random((16, 16, 3)) * 0.05, 0.5 + rng.random((16, 16, 3)) * 0.5]).astype(np.float32)
    out = keras.ops.convert_to_numpy(ImageStandardization()(images))
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2)), 1.0, atol=1e-4)
    # A flat image is not blown up: its standard deviation is floored at min_std.
    flat = np.full((1, 8, 8, 1), 0.3, np.float32)
    flat[0, 0, 0, 0] = 0.3 + 1e-4
    assert np.abs(keras.ops.convert_to_numpy(ImageStandardization(min_std=0.01)(flat))).max() < 0.02
    # The option is part of the saved inference model, and it makes the model exposure-invariant.
    model = build_model("unet", input_shape=(None, None, 3), depth=2, base_filters=4, input_norm="image")
    x = rng.random((1, 32, 32, 3)).astype(np.float32)
    y = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(0.1 * x)), y, atol=1e-5)
    model.save(tmp_path / "m.keras")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.saving.load_model(tmp_path / "m.keras")(x)), y,
                               atol=1e-6)
    with pytest.raises(ConfigError, match="input_norm"):
        build_model("unet", input_shape=(None, None, 3), depth=2, input_norm="minmax")


@pytest.mark.jax
@pytest.mark.slow
def test_builders_run_on_jax_backend():
    pytest.importorskip("jax")
    code = textwrap.dedent(
        """
        import tempfile, numpy as np, keras
        from kseg.models import build_model
        assert keras.backend.backend() == "jax"
        for name, kw in [("unet", dict(depth=2, base_filters=4, residual=True, input_norm="image")),
                         ("fcn8s", dict(width=2, convs_per_block=(1,) * 5, fc_width=8, input_norm="image"))]:
            m = build_model(name, input_shape=(None, None, 3), **kw)
            x = np.random.default_rng(0).random((1, 32, 32, 3), dtype=np.float32)
            y = keras.ops.convert_to_numpy(m(x))
            assert y.shape == (1, 32, 32, 1), y.shape
            path = tempfile.mkdtemp() + "/m.keras"
            m.save(path)
            z = keras.ops.convert_to_numpy(keras.saving.load_model(path)(x))
            np.testing.assert_allclose(z, y, atol=1e-6)
        print("ok")
        """
    )
    run_on_jax(code)
