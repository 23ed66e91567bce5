"""Encoders: ``keras.applications`` networks (one data entry each), keras-hub presets from a local
folder, and a configurable VGG backbone.

``build_encoder(name, input_shape, depth=..., weights=...)`` returns ``(model, strides)``: a
multi-output Functional model named ``"encoder"`` whose outputs are the skip features at the
strides below ``2**depth`` (ascending), then the bottleneck at stride ``2**depth``. Decoders nest
it, so ``model.get_layer("encoder")`` reaches it (e.g. to freeze it).

Input: the encoder takes kseg's images in [0, 1]; its first layer (``"input_scaling"``, an
``ImageScaling``) maps them to what its weights expect (``kseg.nn.input_scaling``), so training,
validation and submission feed the same [0, 1] arrays and a saved model carries its own
normalisation. ``scale_inputs=False`` leaves that layer out: the FPN of Mask R-CNN does so and
documents ``encoder_preprocess`` (0..255 arrays) for its callers instead.

``keras.applications`` entries (``ENCODERS``) are built with ``weights=None`` on the scaled input
(their layers sit directly in ``"encoder"``: ``encoder.get_layer("conv1_conv")`` works); a LOCAL
weights file (include_top=False) may then be loaded. Nothing downloads. Adding a network is a data
entry: constructor, the layer giving the feature at each stride, the scaling convention.

==========================  ================================================  =========
names                       features at strides                               scaling
==========================  ================================================  =========
resnet50, 101, 152          2, 4, 8, 16, 32 (block outputs)                   caffe
resnet50v2, 101v2, 152v2    2, 4, 8, 16, 32 (pre-activations)                 tf
efficientnetb0 ... b7       2, 4, 8, 16, 32                                   raw255
efficientnetv2b0 ... b3, s  2, 4, 8, 16, 32                                   raw255
convnext_tiny, small, base  4, 8, 16, 32: the 4x4 stride-4 stem leaves no     raw255
                            stride-2 feature, so a decoder's stride-2 (and
                            full-resolution) level gets no skip and just
                            upsamples (the U-Net's ``if 2**i in skips``)
densenet121, 169, 201       2, 4, 8, 16, 32                                   torch
vgg16, vgg19                1, 2, 4, 8, 16, 32                                caffe
==========================  ================================================  =========

``keras_hub:<folder>``: a keras-hub backbone preset saved on local disk (``kseg.nn.hub_encoders``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np
from keras import layers

from kseg.core.errors import ConfigError
from kseg.nn import hub_encoders
from kseg.nn.input_scaling import SCALINGS, image_scaling


@dataclass(frozen=True)
class EncoderSpec:
    """A ``keras.applications`` encoder: constructor, feature layer by stride, input scaling.

    ``scaling`` names a convention of ``kseg.nn.input_scaling.SCALINGS``; ``preprocess_module`` is
    the keras.applications module whose ``preprocess_input`` does the same to 0..255 arrays.
    """

    name: str
    constructor: str
    features: dict[int, str]
    preprocess_module: str
    scaling: str

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(f"encoder {self.name!r}: unknown scaling {self.scaling!r}")

    @property
    def max_depth(self) -> int:
        return max(self.features).bit_length() - 1

    @property
    def depths(self) -> list[int]:
        """The depths it supports: the bottleneck 2**depth must be one of its feature strides."""
        return sorted(s.bit_length() - 1 for s in self.features if s >= 2)


_RESNET_STEM = {2: "conv1_relu", 4: "conv2_block3_out", 8: "conv3_block4_out"}
_RESNET_V2_STEM = {2: "conv1_conv", 4: "conv2_block3_preact_relu"}
_EFFICIENTNET = {
    2: "block2a_expand_activation",
    4: "block3a_expand_activation",
    8: "block4a_expand_activation",
    16: "block6a_expand_activation",
    32: "top_activation",
}
_EFFICIENTNET_V2_DEEP = {
    8: "block4a_expand_activation",
    16: "block6a_expand_activation",
    32: "top_activation",
}
_DENSENET = {2: "conv1_relu", 4: "pool2_relu", 8: "pool3_relu", 16: "pool4_relu", 32: "relu"}


def _convnext(size: str, deep_blocks: int) -> dict[int, str]:
    prefix = f"convnext_{size}_stage"
    return {4: f"{prefix}_0_block_2_identity", 8: f"{prefix}_1_block_2_identity",
            16: f"{prefix}_2_block_{deep_blocks - 1}_identity", 32: f"{prefix}_3_block_2_identity"}


ENCODERS: dict[str, EncoderSpec] = {spec.name: spec for spec in (
    EncoderSpec("resnet50", "ResNet50", {**_RESNET_STEM, 16: "conv4_block6_out",
                                         32: "conv5_block3_out"}, "resnet50", "caffe"),
    EncoderSpec("resnet101", "ResNet101", {**_RESNET_STEM, 16: "conv4_block23_out",
                                           32: "conv5_block3_out"}, "resnet", "caffe"),
    EncoderSpec("resnet152", "ResNet152", {2: "conv1_relu", 4: "conv2_block3_out",
                                           8: "conv3_block8_out", 16: "conv4_block36_out",
                                           32: "conv5_block3_out"}, "resnet", "caffe"),
    EncoderSpec("resnet50v2", "ResNet50V2", {**_RESNET_V2_STEM, 8: "conv3_block4_preact_relu",
                                             16: "conv4_block6_preact_relu", 32: "post_relu"},
                "resnet_v2", "tf"),
    EncoderSpec("resnet101v2", "ResNet101V2", {**_RESNET_V2_STEM, 8: "conv3_block4_preact_relu",
                                               16: "conv4_block23_preact_relu", 32: "post_relu"},
                "resnet_v2", "tf"),
    EncoderSpec("resnet152v2", "ResNet152V2", {**_RESNET_V2_STEM, 8: "conv3_block8_preact_relu",
                                               16: "conv4_block36_preact_relu", 32: "post_relu"},
                "resnet_v2", "tf"),
    *(EncoderSpec(f"efficientnetb{k}", f"EfficientNetB{k}", _EFFICIENTNET, "efficientnet", "raw255")
      for k in range(8)),
    EncoderSpec("efficientnetv2b0", "EfficientNetV2B0",
                {2: "block1a_project_activation", 4: "block2b_add", **_EFFICIENTNET_V2_DEEP},
                "efficientnet_v2", "raw255"),
    *(EncoderSpec(f"efficientnetv2b{k}", f"EfficientNetV2B{k}",
                  {2: "block1b_add", 4: "block2c_add", **_EFFICIENTNET_V2_DEEP},
                  "efficientnet_v2", "raw255") for k in (1, 2, 3)),
    EncoderSpec("efficientnetv2s", "EfficientNetV2S",
                {2: "block1b_add", 4: "block2d_add", **_EFFICIENTNET_V2_DEEP},
                "efficientnet_v2", "raw255"),
    EncoderSpec("convnext_tiny", "ConvNeXtTiny", _convnext("tiny", 9), "convnext", "raw255"),
    EncoderSpec("convnext_small", "ConvNeXtSmall", _convnext("small", 27), "convnext", "raw255"),
    EncoderSpec("convnext_base", "ConvNeXtBase", _convnext("base", 27), "convnext", "raw255"),
    *(EncoderSpec(f"densenet{k}", f"DenseNet{k}", _DENSENET, "densenet", "torch")
      for k in (121, 169, 201)),
    EncoderSpec("vgg16", "VGG16", {1: "block1_conv2", 2: "block2_conv2", 4: "block3_conv3",
                                   8: "block4_conv3", 16: "block5_conv3", 32: "block5_pool"},
                "vgg16", "caffe"),
    EncoderSpec("vgg19", "VGG19", {1: "block1_conv2", 2: "block2_conv2", 4: "block3_conv4",
                                   8: "block4_conv4", 16: "block5_conv4", 32: "block5_pool"},
                "vgg19", "caffe"),
)}
"""The ``keras.applications`` encoders by name (``model.args.encoder``)."""

# EfficientNet's ImageNet files store the RGB standard deviations as the Normalization
# layer's *variance*; keras.applications compensates with an extra Rescaling layer only when it
# downloads the weights itself. After loading such a file we square the stored values instead,
# which gives the same (x - mean) / std.
_IMAGENET_STDDEV_RGB = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def get_encoder_spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown encoder {name!r}; available: {', '.join(sorted(ENCODERS))}, "
            f"'{hub_encoders.HUB_PREFIX}<preset folder>' (a keras-hub backbone saved on local disk), "
            "or None for the plain U-Net encoder"
        ) from None


def list_encoders() -> list[str]:
    """Every encoder name a config may give: the applications, then the keras-hub form."""
    return sorted(ENCODERS) + [f"{hub_encoders.HUB_PREFIX}<preset folder>"]


def encoder_max_depth(name: str) -> int:
    """The default (deepest) depth of an encoder: 5 (stride 32) for keras-hub presets, whose
    depth is only known once the preset is read (``build_encoder`` checks it)."""
    if hub_encoders.is_hub_encoder(name):
        return hub_encoders.HUB_DEFAULT_DEPTH
    return get_encoder_spec(name).max_depth


def encoder_preprocess(name: str | None) -> Callable[[np.ndarray], np.ndarray]:
    """The input preprocessing an encoder expects, for float arrays of RGB values in 0..255.

    Encoders built by ``build_encoder`` apply it themselves (to [0, 1] inputs); this is for
    models built with ``scale_inputs=False``, such as the Mask R-CNN FPN.
    """
    if name is None:
        return lambda x: x
    spec = get_encoder_spec(name)
    module = getattr(keras.applications, spec.preprocess_module)
    return module.preprocess_input


def load_encoder_weights(model: keras.Model, path: str | Path) -> None:
    """Load a local weights file (``.weights.h5`` or legacy Keras ``.h5``) into an encoder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"encoder weights file {path} does not exist")
    try:
        model.load_weights(str(path))
    except Exception as exc:  # any loader error is a mismatch between file and architecture
        raise ConfigError(
            f"could not load encoder weights {path} into {model.name!r} "
            f"(is it the same architecture, include_top=False, same input channels?): {exc}"
        ) from exc
    for layer in model.layers:
        stored = getattr(layer, "adapt_variance", None)
        if not isinstance(layer, layers.Normalization) or stored is None:
            continue
        variance = keras.ops.convert_to_numpy(stored)
        if variance.shape == (3,) and np.allclose(variance, _IMAGENET_STDDEV_RGB, atol=1e-4):
            stored.assign(np.square(variance))
            layer.finalize_state()


def build_encoder(
    name: str,
    input_shape: Sequence[int | None],
    *,
    depth: int = 5,
    weights: str | Path | None = None,
    scale_inputs: bool = True,
) -> tuple[keras.Model, list[int]]:
    """Multi-output encoder model ``"encoder"`` and the stride of each output.

    Outputs: the skip features at strides below ``2**depth`` (ascending), then the
    bottleneck feature at stride ``2**depth``. Stages deeper than ``depth`` are left out.
    ``name`` is an ``ENCODERS`` entry or ``"keras_hub:<preset folder>"``; ``weights`` a local
    file for an entry (a keras-hub preset carries its own). With ``scale_inputs`` (the default)
    the model takes images in [0, 1] and normalises them as its weights expect.
    """
    if hub_encoders.is_hub_encoder(name):
        if weights is not None:
            raise ConfigError(f"encoder {name!r}: a keras-hub preset carries its own weights; leave "
                              "encoder_weights unset (or save the weights into the preset folder)")
        return hub_encoders.build_hub_encoder(name, input_shape, depth=depth,
                                              scale_inputs=scale_inputs)
    spec = get_encoder_spec(name)
    if depth not in spec.depths:
        raise ConfigError(f"encoder {name!r} supports depth {spec.depths[0]}..{spec.max_depth} "
                          f"(features at strides {sorted(spec.features)}), got {depth}")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = image_scaling(inputs, spec.scaling, channels=input_shape[-1],
                      what=f"encoder {name!r}") if scale_inputs else inputs
    constructor = getattr(keras.applications, spec.constructor)
    app = constructor(include_top=False, weights=None, input_tensor=x,
                      input_shape=tuple(input_shape))
    if weights is not None:
        load_encoder_weights(app, weights)
    strides = sorted(s for s in spec.features if s <= 2**depth)
    outputs = [app.get_layer(spec.features[s]).output for s in strides]
    return keras.Model(inputs, outputs, name="encoder"), strides


# ----------------------------------------------------------------------------- VGG backbone

#: VGG16: conv layers per block; channels are width * (1, 2, 4, 8, 8).
VGG16_CONVS = (2, 2, 3, 3, 3)
_VGG_MULTIPLIERS = (1, 2, 4, 8, 8)


def vgg_backbone(
    x,
    *,
    width: int = 64,
    convs_per_block: Sequence[int] = VGG16_CONVS,
    batch_norm: bool = False,
    pool_padding: str = "valid",
) -> dict[str, object]:
    """VGG-style 3x3 conv stacks with 2x2 max pooling after each of the five blocks.

    ``pool_padding="same"`` rounds odd sizes up (Caffe's ceil mode, which SSD300 relies on:
    75 -> 38 after block 3); the default rounds down like keras.applications.VGG16.

    Layer names follow ``keras.applications.VGG16`` (``block3_conv2``, ``block4_pool``, ...),
    so with ``width=64`` and the default ``convs_per_block`` the ImageNet VGG16 weights can be
    copied by name (``copy_vgg16_weights``). Returns the tensors ``block{i}_pool`` for i=1..5
    (strides 2..32) and ``block{i}_out`` (the last conv of block i, before pooling).
    """
    if len(convs_per_block) != 5 or min(convs_per_block) < 1:
        raise ConfigError(
            f"convs_per_block needs five positive counts (VGG16: {VGG16_CONVS}), "
            f"got {tuple(convs_per_block)}"
        )
    if width < 1:
        raise ConfigError(f"width must be >= 1, got {width}")
    feats: dict[str, object] = {}
    for b, (n_convs, mult) in enumerate(zip(convs_per_block, _VGG_MULTIPLIERS), start=1):
        for c in range(1, n_convs + 1):
            prefix = f"block{b}_conv{c}"
            x = layers.Conv2D(width * mult, 3, padding="same", use_bias=not batch_norm,
                              name=prefix)(x)
            if batch_norm:
                x = layers.BatchNormalization(name=f"block{b}_bn{c}")(x)
            x = layers.Activation("relu", name=f"block{b}_relu{c}")(x)
        feats[f"block{b}_out"] = x
        x = layers.MaxPooling2D(2, strides=2, padding=pool_padding, name=f"block{b}_pool")(x)
        feats[f"block{b}_pool"] = x
    return feats


def copy_vgg16_weights(model: keras.Model, path: str | Path, input_channels: int = 3) -> None:
    """Copy the conv weights of a local VGG16 (include_top=False) weights file into ``model``.

    ``model`` must contain a full-width VGG16 backbone built by ``vgg_backbone`` without batch
    norm; layers are matched by name (``block1_conv1`` ... ``block5_conv3``).
    """
    src = keras.applications.VGG16(include_top=False, weights=None,
                                   input_shape=(None, None, input_channels))
    load_encoder_weights(src, path)
    for layer in src.layers:
        if not layer.weights:
            continue
        try:
            target = model.get_layer(layer.name)
        except ValueError:
            raise ConfigError(
                f"VGG16 weights {path}: the model has no layer {layer.name!r}; build it with "
                f"width=64 and convs_per_block={VGG16_CONVS}"
            ) from None
        src_w, dst_w = layer.get_weights(), target.get_weights()
        if [w.shape for w in src_w] != [w.shape for w in dst_w]:
            raise ConfigError(
                f"VGG16 weights {path}: layer {layer.name!r} has shapes "
                f"{[w.shape for w in dst_w]}, the file {[w.shape for w in src_w]}; build with "
                "width=64, batch_norm=False and 3 input channels"
            )
        target.set_weights(src_w)
