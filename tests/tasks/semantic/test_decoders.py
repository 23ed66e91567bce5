"""The semantic decoders U-Net++, FPN, DeepLabV3+ and LinkNet, scSE attention and hypercolumns:
each decoder's structure, every head and encoder through the weighted training graph, NumPy
references for scSE and ASPP image pooling, overfitting on TF and agreement with JAX."""

from __future__ import annotations

import re
import textwrap

import keras
import numpy as np
import pytest
from backends import run_on_jax
from test_semantic_models import _disk_data

from kseg.core.errors import ConfigError
from kseg.nn.backbones import ENCODERS
from kseg.nn.registry import build_model, input_divisor
from kseg.tasks.semantic.attention import scse
from kseg.tasks.semantic.decoders import require_strides
from kseg.tasks.semantic.fpn_decoder import fpn_groups
from kseg.tasks.semantic.training_graph import build_training_model
from kseg.tasks.semantic.unetpp import nested_nodes

# Tiny widths per decoder; the encoder options (depth, base_filters) are dropped with an encoder.
TINY = {
    "unet": dict(depth=2, base_filters=4),
    "unetpp": dict(depth=2, base_filters=4),
    "linknet": dict(depth=2, base_filters=4),
    "fpn": dict(base_filters=1, pyramid_filters=8, segmentation_filters=4),
    "deeplabv3plus": dict(base_filters=1, aspp_filters=8, low_level_filters=4, decoder_filters=8,
                          atrous_rates=(1, 2, 3)),
}
NEW_DECODERS = ("unetpp", "fpn", "deeplabv3plus", "linknet")
DECODERS = ("unet", *NEW_DECODERS)
HEADS = {
    "mask": dict(targets="mask"),
    "mask+border": dict(targets="mask+border"),
    "mask+center": dict(targets="mask+center"),
    "classes3": dict(n_classes=3),
}
ENCODER_OPTIONS = ("depth", "base_filters")


def _images(n: int, size: int | tuple[int, int], channels: int = 3, seed: int = 0) -> np.ndarray:
    h, w = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).random((n, h, w, channels), dtype=np.float32)


def _out(model: keras.Model, x) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(x, training=False))


def _producer(tensor) -> str:
    return tensor._keras_history.operation.name


def _inputs_of(model: keras.Model, layer_name: str) -> list[str]:
    inputs = model.get_layer(layer_name).input
    return [_producer(t) for t in (inputs if isinstance(inputs, list) else [inputs])]


def _submodel(model: keras.Model, *names: str) -> keras.Model:
    return keras.Model(model.inputs, [model.get_layer(n).output for n in names])


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _bilinear_upsample(image: np.ndarray, factor: int) -> np.ndarray:
    """(H, W, C) -> (factor H, factor W, C), half-pixel centres, edges clamped (as tf.image.resize)."""

    def weights(n: int) -> np.ndarray:
        src = np.clip((np.arange(n * factor) + 0.5) / factor - 0.5, 0, n - 1)
        lo = np.floor(src).astype(int)
        hi, t = np.minimum(lo + 1, n - 1), src - lo
        matrix = np.zeros((n * factor, n))
        np.add.at(matrix, (np.arange(n * factor), lo), 1 - t)
        np.add.at(matrix, (np.arange(n * factor), hi), t)
        return matrix

    return np.einsum("ih,jw,hwc->ijc", weights(image.shape[0]), weights(image.shape[1]), image)


def _train_step(model: keras.Model, head: dict, batch: int = 2, seed: int = 0) -> None:
    """One eager step through the pixel-weighted training graph; every trainable weight moves.

    In a nested ``"encoder"`` only the stem must move: EfficientNets drop whole blocks at
    random in training (stochastic depth), so a step may skip a block's weights.
    """
    size = model.inputs[0].shape[1] or 32
    classes = head.get("n_classes", 1) > 1
    training = build_training_model(model, loss="ce" if classes else "bce")
    training.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=True)
    rng = np.random.default_rng(seed)
    channels = 1 if classes else model.outputs[0].shape[-1]
    target = rng.integers(0, 3 if classes else 2, (batch, size, size, channels)).astype(np.float32)
    x = {"image": _images(batch, size, seed=seed),
         "weight_map": rng.uniform(0.5, 2.0, (batch, size, size, 1)).astype(np.float32),
         "target": target}
    encoder = [layer for layer in model.layers if layer.name == "encoder"]
    stem = encoder[0].trainable_weights[:1] if encoder else []
    skipped = {id(w) for w in encoder[0].trainable_weights[1:]} if encoder else set()
    checked = [w for w in model.trainable_weights if id(w) not in skipped]
    assert len(checked) > len(stem)
    before = [w.numpy().copy() for w in checked]
    loss = training.train_on_batch(x)
    assert np.isfinite(loss)
    frozen = [w.path for b, w in zip(before, checked) if np.array_equal(b, w.numpy())]
    assert not frozen, f"weights not reached by the loss: {frozen}"


# ----------------------------------------------------------------------------- every head, dynamic size


@pytest.mark.parametrize("name, head", [(name, list(HEADS)[k % len(HEADS)]) for k, name in enumerate(DECODERS)])
def test_plain_decoder_trains_one_step(name, head):
    """Each decoder on the plain contracting path; every head meets every decoder on the
    keras-hub families below."""
    keras.utils.set_random_seed(0)
    model = build_model(name, input_shape=(32, 32, 3), **TINY[name], **HEADS[head])
    n_out = HEADS[head].get("n_classes") or len(head.split("+"))
    assert model.outputs[0].shape[1:] == (32, 32, n_out)
    _train_step(model, HEADS[head])


@pytest.mark.parametrize("name", NEW_DECODERS)
def test_dynamic_input_sizes(name):
    model = build_model(name, input_shape=(None, None, 1), **TINY[name])
    divisor = input_divisor(name, **TINY[name])
    assert divisor == {"unetpp": 4, "linknet": 4, "fpn": 32, "deeplabv3plus": 16}[name]
    for size in ((32, 32), (64, 64), (32, 64)):
        assert _out(model, _images(1, size, channels=1)).shape == (1, *size, 1)


@pytest.mark.parametrize("name, options", [("deeplabv3plus", {})])
def test_compiled_training_step_on_inputs_of_unknown_size(name, options):
    """kseg trains on (None, None) inputs inside a compiled graph, where the height is a tensor.
    DeepLabV3+ holds every size-dependent op of the decoders: bilinear upsampling (Keras'
    UpSampling2D needs the height as a Python number; kseg's BilinearUpsample, tested alone in a
    compiled graph, does not), the image-pooling broadcast and dilated convolutions. U-Net with
    hypercolumns and deep supervision trains compiled in test_auxiliary_outputs' demo run."""
    keras.utils.set_random_seed(0)
    tiny = dict(TINY.get(name, dict(depth=2, base_filters=2)))
    model = build_model(name, input_shape=(None, None, 3), **tiny, **options)
    training = build_training_model(model, loss="bce")
    training.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    rng = np.random.default_rng(0)
    batch = {"image": _images(2, 32), "weight_map": np.ones((2, 32, 32, 1), np.float32),
             "target": rng.integers(0, 2, (2, 32, 32, 1)).astype(np.float32)}
    assert np.isfinite(training.train_on_batch(batch))


def test_mixed_precision_keeps_float32_output():
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        for name in NEW_DECODERS:
            model = build_model(name, input_shape=(None, None, 3), attention="scse", **TINY[name])
            assert model.get_layer("head").compute_dtype == "float16"
            y = _out(model, _images(1, 32))
            assert y.dtype == np.float32 and np.isfinite(y).all()
    finally:
        keras.config.set_dtype_policy(policy)


# ----------------------------------------------------------------------------- keras.applications encoders


_SIZE_WORDS = {"tiny": 0, "small": 1, "base": 2, "large": 3, "xlarge": 4}


def _size_key(name: str) -> tuple:
    """Order a family's members smallest first: resnet50 < resnet101, convnext_tiny < _base."""
    return tuple((0, int(t)) if t.isdigit() else (0, _SIZE_WORDS[t]) if t in _SIZE_WORDS else (1, t)
                 for t in re.findall(r"\d+|[a-z]+", name))


def _encoder_families() -> list[str]:
    """The smallest member of every keras.applications family in ENCODERS (vgg16/vgg19: one)."""
    families: dict[str, list[str]] = {}
    for name, spec in ENCODERS.items():
        module = getattr(keras.applications, spec.constructor).__module__.rsplit(".", 1)[-1]
        families.setdefault(module.rstrip("0123456789"), []).append(name)
    return sorted(min(members, key=_size_key) for members in families.values())


def _encoder_cases():
    """Every decoder on VGG (the one family with a stride-1 feature); every other family with one
    decoder, each decoder in turn (heads cycle). The decoders see an encoder only through its
    strides, which the keras-hub families below cover with every decoder at tiny sizes."""
    others = [e for e in _encoder_families() if not e.startswith("vgg")]
    cases = [("vgg16", name) for name in DECODERS] + [(e, DECODERS[k % len(DECODERS)]) for k, e in enumerate(others)]
    return [(encoder, name, list(HEADS)[k % len(HEADS)]) for k, (encoder, name) in enumerate(cases)]


@pytest.mark.slow
@pytest.mark.parametrize("encoder,name,head", _encoder_cases())
def test_decoder_on_applications_encoder_trains_one_step(encoder, name, head):
    _step_on_encoder(name, encoder, head, size=64, batch=1)


def _step_on_encoder(name: str, encoder: str, head: str, size: int, batch: int) -> None:
    """The tiny decoder on ``encoder``: bottleneck at its stride, full-size output with the
    head's channels, one eager step that moves every weight."""
    keras.utils.set_random_seed(0)
    tiny = {k: v for k, v in TINY[name].items() if k not in ENCODER_OPTIONS}
    model = build_model(name, input_shape=(size, size, 3), encoder=encoder, **tiny, **HEADS[head])
    bottom = 16 if name == "deeplabv3plus" else 32
    assert model.get_layer("encoder").outputs[-1].shape[1:3] == (size // bottom, size // bottom)
    n_out = HEADS[head].get("n_classes") or len(head.split("+"))
    assert model.outputs[0].shape[1:] == (size, size, n_out)
    _train_step(model, HEADS[head], batch=batch)


# ----------------------------------------------------------------------------- keras-hub families


# One tiny preset per keras-hub backbone class with pyramid outputs. The pre-activation ResNet and
# CSPResNet variants give the decoders the same strides (2..32) as ResNet and CSPDarkNet; their own
# stride-2 taps are checked in test_encoders.
HUB_BACKBONES = ("resnet", "efficientnet", "densenet", "mit", "cspdarknet")


def _hub_cases():
    """Every decoder on every keras-hub backbone class (tiny presets); every head meets every decoder."""
    cases = [(family, name) for family in HUB_BACKBONES for name in DECODERS]
    return [pytest.param(family, name, list(HEADS)[k % len(HEADS)],
                         marks=[pytest.mark.slow] if family == "mit" else [])  # 4 s per build on 2 cores
            for k, (family, name) in enumerate(cases)]


@pytest.mark.parametrize("family,name,head", _hub_cases())
def test_every_decoder_trains_one_step_on_every_keras_hub_family(presets, family, name, head):
    _step_on_encoder(name, presets(family), head, size=32, batch=2)


# ----------------------------------------------------------------------------- U-Net++


def test_unetpp_nested_nodes_concatenate_their_row_and_the_node_below():
    model = build_model("unetpp", input_shape=(32, 32, 3), depth=3, base_filters=4)
    nodes = {(i, j) for i in range(4) for j in range(1, 4) if i + j <= 3}
    built = {(int(n.name[1]), int(n.name[3])) for n in model.layers
             if n.name.startswith("x") and n.name.endswith("_concat")}
    assert built == nodes
    for i, j in sorted(nodes):
        row = [f"enc{i}_out"] + [f"x{i}_{k}_out" for k in range(1, j)]
        assert _inputs_of(model, f"x{i}_{j}_concat") == row + [f"x{i}_{j}_up_out"], (i, j)
        assert _inputs_of(model, f"x{i}_{j}_up_out") == [f"x{i + 1}_{j - 1}_out" if j > 1 else
                                                          ("bottleneck_out" if i == 2 else f"enc{i + 1}_out")]
        out = model.get_layer(f"x{i}_{j}_out").output
        assert out.shape[1:] == (32 // 2**i, 32 // 2**i, 4 * 2**i)
    assert _inputs_of(model, "head") == ["x0_3_out"]


def test_unetpp_grid_leaves_out_levels_the_encoder_lacks():
    # A ResNet has no stride-1 feature: level 0 keeps only the last node of the decoding path.
    assert nested_nodes(5, {1, 2, 3, 4}) == [
        (4, 1), (3, 1), (2, 1), (1, 1), (3, 2), (2, 2), (1, 2), (2, 3), (1, 3), (1, 4), (0, 5)]
    assert len(nested_nodes(4, {0, 1, 2, 3})) == 10
    assert nested_nodes(2, set()) == [(1, 1), (0, 2)]  # no skips at all: a plain decoder


# ----------------------------------------------------------------------------- FPN


@pytest.mark.parametrize("merge", ["add", "concat"])
def test_fpn_merges_four_stride4_branches(merge):
    model = build_model("fpn", input_shape=(64, 64, 3), merge=merge, dropout=0.0, **TINY["fpn"])
    for k in (2, 3, 4, 5):
        assert model.get_layer(f"fpn_p{k}").output.shape[1:] == (64 // 2**k, 64 // 2**k, 8)
        ups = [layer for layer in model.layers if layer.name.startswith(f"seg_p{k}_") and layer.name.endswith("_up")]
        assert len(ups) == k - 2
    assert _inputs_of(model, "fpn_c5p5") == ["bottleneck_out"]
    assert _inputs_of(model, "fpn_c2p2") == ["enc2_out"]
    branch_names = [f"seg_p{k}_{max(1, k - 2)}_" + ("relu" if k == 2 else "up") for k in (2, 3, 4, 5)]
    assert _inputs_of(model, "seg_merge") == branch_names
    sub = _submodel(model, *branch_names, "seg_merge")
    *branches, merged = [keras.ops.convert_to_numpy(t) for t in sub(_images(2, 64), training=False)]
    assert merged.shape == (2, 16, 16, 4 if merge == "add" else 16)
    expected = np.sum(branches, axis=0) if merge == "add" else np.concatenate(branches, axis=-1)
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-6)
    assert _inputs_of(model, "head") == ["seg_merge"]
    assert model.get_layer("head_upsample").output.shape[1:] == (64, 64, 1)


def test_fpn_group_norm_keeps_two_channels_per_group():
    assert [fpn_groups(f) for f in (128, 256, 64, 48, 16, 4, 2, 3, 1)] == [32, 32, 32, 8, 8, 2, 1, 1, 1]
    model = build_model("fpn", input_shape=(32, 32, 3), **TINY["fpn"])  # P5 is 1x1 here
    assert model.get_layer("seg_p5_1_gn").groups == 2


# ----------------------------------------------------------------------------- DeepLabV3+


def test_deeplab_aspp_rates_and_stride4_decoder():
    model = build_model("deeplabv3plus", input_shape=(64, 64, 3), **dict(TINY["deeplabv3plus"], atrous_rates=(2, 3, 5)))
    assert [model.get_layer(f"aspp_atrous{k}_conv").dilation_rate for k in (1, 2, 3)] == [(2, 2), (3, 3), (5, 5)]
    assert model.get_layer("aspp_concat").output.shape[1:] == (4, 4, 5 * 8)  # stride 16, five branches
    assert _inputs_of(model, "low_level_conv") == ["enc2_out"]  # stride 4
    assert model.get_layer("low_level_relu").output.shape[1:] == (16, 16, 4)
    assert _inputs_of(model, "decoder_concat") == ["aspp_upsample", "low_level_relu"]
    assert model.get_layer("decoder_out").output.shape[1:] == (16, 16, 8)
    with pytest.raises(ValueError):
        model.get_layer("aspp_atrous4_conv")
    six = build_model("deeplabv3plus", input_shape=(32, 32, 3), **dict(TINY["deeplabv3plus"], atrous_rates=(6, 12, 18)))
    assert six.get_layer("aspp_atrous3_conv").dilation_rate == (18, 18)


def test_deeplab_image_pooling_is_a_spatially_constant_numpy_reference():
    keras.utils.set_random_seed(3)
    model = build_model("deeplabv3plus", input_shape=(None, None, 3), **TINY["deeplabv3plus"])
    conv = model.get_layer("aspp_pool_conv")
    rng = np.random.default_rng(3)
    kernel, bias = rng.normal(0, 0.5, conv.kernel.shape), rng.normal(0, 0.5, conv.bias.shape)
    conv.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    sub = _submodel(model, "bottleneck_out", "aspp_pool_out")
    for size in ((32, 32), (48, 64)):
        feature, pooled = [keras.ops.convert_to_numpy(t) for t in sub(_images(2, size, seed=4), training=False)]
        expected = np.maximum(feature.mean(axis=(1, 2)) @ kernel[0, 0] + bias, 0.0)
        assert pooled.shape == (2, size[0] // 16, size[1] // 16, 8)
        np.testing.assert_allclose(pooled, np.broadcast_to(expected[:, None, None, :], pooled.shape),
                                   rtol=1e-5, atol=1e-6)


def test_deeplab_trains_with_batch_size_one():
    keras.utils.set_random_seed(5)
    model = build_model("deeplabv3plus", input_shape=(32, 32, 3), **TINY["deeplabv3plus"])
    assert not any(isinstance(layer, keras.layers.BatchNormalization) and layer.name.startswith("aspp_pool")
                   for layer in model.layers)
    before = model.get_layer("aspp_pool_conv").kernel.numpy().copy()
    _train_step(model, HEADS["mask"], batch=1)  # the pooling branch gets a gradient at batch 1
    assert not np.array_equal(before, model.get_layer("aspp_pool_conv").kernel.numpy())
    assert np.isfinite(_out(model, _images(1, 32))).all()


# ----------------------------------------------------------------------------- LinkNet


def test_linknet_adds_skips_and_blocks_reduce_to_a_quarter():
    model = build_model("linknet", input_shape=(32, 32, 3), depth=3, base_filters=8)
    assert not any(isinstance(layer, keras.layers.Concatenate) for layer in model.layers)
    for i in range(3):
        add = model.get_layer(f"add{i}")
        assert isinstance(add, keras.layers.Add)
        assert _inputs_of(model, f"add{i}") == [f"dec{i}_out", f"enc{i}_out"]
        c_in = 8 * 2 ** (i + 1)
        assert model.get_layer(f"dec{i}_reduce_conv").kernel.shape == (1, 1, c_in, c_in // 4)
        up = model.get_layer(f"dec{i}_up_conv")
        assert isinstance(up, keras.layers.Conv2DTranspose)
        assert up.kernel.shape[:2] == (3, 3) and up.strides == (2, 2)
        assert model.get_layer(f"dec{i}_expand_conv").kernel.shape == (1, 1, c_in // 4, 8 * 2**i)
    sub = _submodel(model, "dec1_out", "enc1_out", "add1")
    block, skip, added = [keras.ops.convert_to_numpy(t) for t in sub(_images(1, 32), training=False)]
    np.testing.assert_allclose(added, block + skip, rtol=1e-6)


# ----------------------------------------------------------------------------- scSE, hypercolumns


@pytest.mark.parametrize("attention,combine", [("scse", np.add), ("scse_max", np.maximum)])
def test_scse_matches_numpy_formula(attention, combine):
    channels = 32
    image = keras.Input((None, None, channels))
    layer_model = keras.Model(image, scse(image, name="att", combine="add" if attention == "scse" else "max"))
    rng = np.random.default_rng(7)
    weights = {}
    for name in ("att_cse_reduce", "att_cse_expand", "att_sse_conv"):
        layer = layer_model.get_layer(name)
        weights[name] = [rng.normal(0, 0.5, w.shape).astype(np.float32) for w in layer.weights]
        layer.set_weights(weights[name])
    assert weights["att_cse_reduce"][0].shape == (1, 1, channels, channels // 16)
    x = rng.normal(0, 1, (2, 5, 6, channels)).astype(np.float32)

    (w1, b1), (w2, b2), (ws, bs) = (weights[n] for n in ("att_cse_reduce", "att_cse_expand", "att_sse_conv"))
    squeeze = x.mean(axis=(1, 2), keepdims=True)
    channel_gate = _sigmoid(np.maximum(squeeze @ w1[0, 0] + b1, 0.0) @ w2[0, 0] + b2)
    spatial_gate = _sigmoid(x @ ws[0, 0] + bs)
    expected = combine(x * channel_gate, x * spatial_gate)
    np.testing.assert_allclose(_out(layer_model, x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["unet", "unetpp", "linknet"])
def test_attention_follows_every_decoder_stage(name):
    model = build_model(name, input_shape=(32, 32, 3), attention="scse", **dict(TINY[name], depth=3))
    stage = {"unetpp": "x{i}_{j}", "unet": "dec{i}", "linknet": "dec{i}"}[name]
    last = {"unet": "dec{i}_out", "linknet": "add{i}", "unetpp": "x{i}_{j}_out"}[name]
    for i in range(3):
        j = 3 - i
        names = dict(i=i, j=j)
        cse, sse = (model.get_layer(stage.format(**names) + f"_scse_{part}") for part in ("cse", "sse"))
        assert _inputs_of(model, cse.name)[0] == last.format(**names)
        assert _inputs_of(model, sse.name)[0] == last.format(**names)
    assert _inputs_of(model, "head") == [stage.format(i=0, j=3) + "_scse_out"]


@pytest.mark.parametrize("name", ["unet", "unetpp", "linknet"])
def test_hypercolumns_concatenate_every_stage_at_full_resolution(name):
    model = build_model(name, input_shape=(32, 32, 3), hypercolumns=True, **dict(TINY[name], depth=3))
    stage = {"unet": "dec{i}_out", "unetpp": "x{i}_{j}_out", "linknet": "add{i}"}[name]
    stages = [stage.format(i=i, j=3 - i) for i in range(3)]
    assert _inputs_of(model, "hypercolumn") == [stages[0], "hypercolumn_up2", "hypercolumn_up4"]
    assert [_inputs_of(model, f"hypercolumn_up{2**i}") for i in (1, 2)] == [[stages[1]], [stages[2]]]
    assert model.get_layer("hypercolumn").output.shape[1:] == (32, 32, 4 + 8 + 16)
    assert _inputs_of(model, "head") == ["hypercolumn"]
    sub = _submodel(model, *stages, "hypercolumn")
    *outputs, column = [keras.ops.convert_to_numpy(t)[0] for t in sub(_images(1, 32), training=False)]
    expected = np.concatenate([_bilinear_upsample(stage, 2**i) for i, stage in enumerate(outputs)], axis=-1)
    np.testing.assert_allclose(column, expected, rtol=1e-5, atol=1e-5)


def test_unet_defaults_build_no_attention_or_hypercolumn_layers():
    model = build_model("unet", input_shape=(32, 32, 3), **TINY["unet"])
    assert not [layer.name for layer in model.layers if "scse" in layer.name or "hypercolumn" in layer.name]
    assert _inputs_of(model, "head") == ["dec0_out"]


# ----------------------------------------------------------------------------- option errors


def test_bad_decoder_options_are_config_errors():
    with pytest.raises(ConfigError, match="attention must be None, 'scse'"):
        build_model("unetpp", attention="cbam", **TINY["unetpp"])
    with pytest.raises(ConfigError, match="merge must be 'add'"):
        build_model("fpn", merge="mean", **TINY["fpn"])
    with pytest.raises(ConfigError, match="segmentation_filters must be >= 1"):
        build_model("fpn", segmentation_filters=0)
    with pytest.raises(ConfigError, match="atrous_rates must be positive integers"):
        build_model("deeplabv3plus", atrous_rates=(6, 0, 18))
    with pytest.raises(ConfigError, match="atrous_rates must be positive integers"):
        build_model("deeplabv3plus", atrous_rates=(1.5,))
    with pytest.raises(ConfigError, match=r"height 40 is not divisible by 2\*\*5=32; use 32 or 64"):
        build_model("fpn", input_shape=(40, 64, 3), **TINY["fpn"])
    with pytest.raises(ConfigError, match=r"width 40 is not divisible by 2\*\*4=16; use 32 or 48"):
        build_model("deeplabv3plus", input_shape=(32, 40, 3), **TINY["deeplabv3plus"])
    with pytest.raises(ConfigError, match="no option 'hypercolumns'"):
        build_model("fpn", hypercolumns=True)
    with pytest.raises(ConfigError, match="input_norm applies to the plain encoder"):
        build_model("linknet", encoder="resnet50", input_norm="image")
    with pytest.raises(ConfigError, match="encoder_weights needs an encoder"):
        build_model("deeplabv3plus", encoder_weights="w.h5")
    with pytest.raises(ConfigError, match="unknown encoder 'resnet18'"):
        build_model("unetpp", encoder="resnet18")
    with pytest.raises(ConfigError, match="upsampling must be"):
        build_model("unetpp", upsampling="nearest")
    with pytest.raises(ConfigError, match="dropout must be in"):
        build_model("linknet", dropout=1.0)
    with pytest.raises(ConfigError, match="fpn needs encoder features at strides 4, 8, 16; .* none at 4"):
        require_strides({2: None, 8: None, 16: None}, (4, 8, 16), decoder="fpn", encoder="odd")


# ----------------------------------------------------------------------------- training, backends


# FPN and DeepLabV3+ predict at stride 4 and upsample the logits bilinearly, which costs disk
# edges at 32 px a few points of IoU; without BatchNorm because, on four images, its moving
# statistics lag the batch statistics enough to spoil their deeper, narrower stride-16 paths.
OVERFIT = {
    "unetpp": (dict(depth=2, base_filters=8), 0.9),
    "fpn": (dict(base_filters=2, pyramid_filters=16, segmentation_filters=16, dropout=0.0,
                 batch_norm=False), 0.85),
    "deeplabv3plus": (dict(base_filters=4, aspp_filters=16, low_level_filters=8, decoder_filters=16,
                           atrous_rates=(1, 2, 3), dropout=0.0, batch_norm=False), 0.85),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OVERFIT))
def test_decoder_overfits_four_images(name):
    kwargs, min_iou = OVERFIT[name]
    keras.utils.set_random_seed(0)
    images, masks = _disk_data()
    model = build_model(name, input_shape=(32, 32, 1), **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy", jit_compile=False)
    x, y = np.repeat(images, 50, axis=0), np.repeat(masks, 50, axis=0)
    model.fit(x, y, batch_size=4, epochs=4, shuffle=True, verbose=0)
    pred = _out(model, images) > 0.5
    truth = masks > 0.5
    iou = (pred & truth).sum() / (pred | truth).sum()
    assert iou > min_iou, iou


# Where the backends could disagree: kseg's image-pooling broadcast layer, dilated convolutions
# and bilinear upsampling (DeepLabV3+), 3x3 stride-2 transposed convolutions (LinkNet), scSE. Each
# case costs JAX ~10-20 s of loading and compiling on 2 cores, so FPN (standard layers only) is
# left to the TensorFlow tests.
JAX_CASES = [
    ("deeplabv3plus", dict(TINY["deeplabv3plus"], n_classes=3, attention="scse_max")),
    ("linknet", dict(TINY["linknet"], hypercolumns=True, attention="scse", targets="mask+border")),
]


@pytest.mark.jax
@pytest.mark.slow
def test_jax_predicts_what_tensorflow_predicts(tmp_path):
    pytest.importorskip("jax")
    rng = np.random.default_rng(11)
    x = rng.random((2, 32, 64, 3), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    for k, (name, kwargs) in enumerate(JAX_CASES):
        keras.utils.set_random_seed(k)
        model = build_model(name, input_shape=(None, None, 3), **kwargs)
        for v in model.trainable_weights:  # move zero biases and unit gammas off their start values
            v.assign(v.numpy() + rng.normal(0.0, 0.1, v.shape).astype(np.float32))
        for v in model.non_trainable_weights:  # BatchNorm moving means and (positive) variances
            v.assign(v.numpy() + rng.uniform(0.0, 0.5, v.shape).astype(np.float32))
        model.save(tmp_path / f"{k}.keras")
        np.save(tmp_path / f"{k}.npy", _out(model, x))
    code = f"""
        import numpy as np, keras
        import kseg.models  # registers the custom layers
        assert keras.backend.backend() == "jax"
        root = {str(tmp_path)!r}
        x = np.load(root + "/x.npy")
        for k in range({len(JAX_CASES)}):
            model = keras.saving.load_model(f"{{root}}/{{k}}.keras", compile=False)
            got = model.predict(x, verbose=0)
            np.testing.assert_allclose(got, np.load(f"{{root}}/{{k}}.npy"), rtol=1e-4, atol=1e-5)
        print("ok")
    """
    run_on_jax(textwrap.dedent(code))
