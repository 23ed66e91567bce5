"""Encoders: pretrained-style ``keras.applications`` networks and a configurable VGG backbone.

``build_encoder("resnet50", ...)`` returns a multi-output Functional model named ``"encoder"``
whose outputs are the feature maps picked by layer name at strides 1 (VGG16 only), 2, 4, 8, 16
and the bottleneck at 2**depth. Weights never download: the application is always built with
``weights=None`` and a local file is loaded with ``load_weights``.

Input scaling each encoder expects (``encoder_preprocess(name)`` returns the matching function
for float32 H x W x 3 RGB arrays in 0..255):

=================  ====================================================================
resnet50, vgg16    "caffe": RGB -> BGR, subtract ImageNet mean (103.939, 116.779, 123.68),
                   no division (keras.applications.resnet50/vgg16.preprocess_input)
efficientnetb0     raw RGB floats in 0..255; the network rescales and normalises inside
                   (its Rescaling + Normalization layers), preprocess is the identity
no encoder         whatever the generator feeds (kseg scales uint8 images to 0..1)
=================  ====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np
from keras import layers

from kseg.core.errors import ConfigError


@dataclass(frozen=True)
class EncoderSpec:
    """A ``keras.applications`` encoder: constructor name and feature layers by stride."""

    name: str
    constructor: str
    features: dict[int, str]
    preprocess_module: str
    input_scaling: str

    @property
    def max_depth(self) -> int:
        return max(self.features).bit_length() - 1


ENCODERS: dict[str, EncoderSpec] = {
    "resnet50": EncoderSpec(
        name="resnet50",
        constructor="ResNet50",
        features={
            2: "conv1_relu",
            4: "conv2_block3_out",
            8: "conv3_block4_out",
            16: "conv4_block6_out",
            32: "conv5_block3_out",
        },
        preprocess_module="resnet50",
        input_scaling="caffe: BGR, ImageNet mean subtracted, 0..255 range",
    ),
    "resnet101": EncoderSpec(
        name="resnet101",
        constructor="ResNet101",
        features={
            2: "conv1_relu",
            4: "conv2_block3_out",
            8: "conv3_block4_out",
            16: "conv4_block23_out",
            32: "conv5_block3_out",
        },
        preprocess_module="resnet101",
        input_scaling="caffe: BGR, ImageNet mean subtracted, 0..255 range",
    ),
    "efficientnetb0": EncoderSpec(
        name="efficientnetb0",
        constructor="EfficientNetB0",
        features={
            2: "block2a_expand_activation",
            4: "block3a_expand_activation",
            8: "block4a_expand_activation",
            16: "block6a_expand_activation",
            32: "top_activation",
        },
        preprocess_module="efficientnet",
        input_scaling="raw RGB 0..255 (rescaling and normalisation are inside the model)",
    ),
    "vgg16": EncoderSpec(
        name="vgg16",
        constructor="VGG16",
        features={
            1: "block1_conv2",
            2: "block2_conv2",
            4: "block3_conv3",
            8: "block4_conv3",
            16: "block5_conv3",
            32: "block5_pool",
        },
        preprocess_module="vgg16",
        input_scaling="caffe: BGR, ImageNet mean subtracted, 0..255 range",
    ),
}

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
            f"unknown encoder {name!r}; available: {', '.join(sorted(ENCODERS))} "
            "(or None for the plain U-Net encoder)"
        ) from None


def encoder_preprocess(name: str | None) -> Callable[[np.ndarray], np.ndarray]:
    """The input preprocessing an encoder expects, for float arrays of RGB values in 0..255."""
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
) -> tuple[keras.Model, list[int]]:
    """Multi-output encoder model ``"encoder"`` and the stride of each output.

    Outputs: the skip features at strides below ``2**depth`` (ascending), then the
    bottleneck feature at stride ``2**depth``. Stages deeper than ``depth`` are left out.
    """
    spec = get_encoder_spec(name)
    if not 1 <= depth <= spec.max_depth:
        raise ConfigError(f"encoder {name!r} supports depth 1..{spec.max_depth}, got {depth}")
    constructor = getattr(keras.applications, spec.constructor)
    app = constructor(include_top=False, weights=None, input_shape=tuple(input_shape))
    if weights is not None:
        load_encoder_weights(app, weights)
    strides = sorted(s for s in spec.features if s <= 2**depth)
    outputs = [app.get_layer(spec.features[s]).output for s in strides]
    return keras.Model(app.inputs, outputs, name="encoder"), strides


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
