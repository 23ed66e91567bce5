"""Feature Pyramid Network (Lin et al., CVPR 2017) on a ResNet, the Mask R-CNN backbone.

Mask R-CNN's RPN and RoI heads read a pyramid of maps that all have the same channel count, so
one set of head weights serves objects of every size. ``resnet_fpn_features(image, backbone)``
returns ``[P2, P3, P4, P5, P6]`` at strides 4, 8, 16, 32, 64 of the input, each with
``fpn_channels`` channels:

* C2..C5 (strides 4..32) come from the backbone, a nested Functional model named ``"encoder"``
  (``model.get_layer("encoder")``, e.g. to freeze it or to save its weights):

  ===========  =================================================================  ==========
  backbone     C2, C3, C4, C5                                                     parameters
  ===========  =================================================================  ==========
  resnet50     keras.applications.ResNet50 layers conv2_block3_out,               23.6M
               conv3_block4_out, conv4_block6_out, conv5_block3_out
               (256, 512, 1024, 2048 channels)
  resnet101    ResNet101: the same with conv4_block23_out                          42.7M
  small        ``small_resnet``: stride-2 3x3 stem conv and 2x2 max pool, then one  77k
               residual block (``blocks.residual_block``) per stage, widths w, 2w,  (w=8)
               4w, 8w with 2x2 max pooling between stages (layers ``c2_out`` ..
               ``c5_out``); BatchNorm off by default, as in the plain U-Net
  ===========  =================================================================  ==========

  (Backbone parameters only. With f = ``fpn_channels`` the pyramid adds 4 * (9 f + 1) f for
  the 3x3 convs and (C2 + C3 + C4 + C5 channels + 4) f for the laterals: 41k on the small
  backbone with f = 32, 118k in all; 3.3M on ResNet-50 with f = 256.)

  The ResNets come from ``backbones.build_encoder`` (``weights=None``, then an optional LOCAL
  weights file, include_top=False; nothing is downloaded); they also output ``conv1_relu``
  (stride 2), which the pyramid does not use. ``weights`` for ``"small"`` is a file written by
  ``model.get_layer("encoder").save_weights("x.weights.h5")`` from a model with the same width.
* The pyramid (``fpn_pyramid``): a 1x1 lateral conv of every C_k to ``fpn_channels``
  (``{name}_c{k}p{k}``); top-down, P5's lateral is upsampled 2x (nearest) and added to C4's
  lateral, and so on down to C2 (``{name}_p{k+1}upsampled``, ``{name}_p{k}add``); a 3x3 conv
  on each sum gives P2..P5 (``{name}_p{k}``); P6 (``{name}_p6``) is P5 subsampled by 2 (max
  pooling with a 1x1 window and stride 2, as in Mask R-CNN) and only feeds the RPN. The layer
  names follow the Matterport Mask R-CNN (``fpn_c5p5``, ``fpn_p4add``, ``fpn_p6``, ...).

Input sizes: height and width must be multiples of 64 (``fpn_divisor()``) so every stride halves
exactly and the top-down additions line up; other sizes raise ``ConfigError`` naming the nearest
valid ones.

Input scaling: kseg feeds float images in [0, 1]. The keras.applications ResNets expect
"caffe" inputs (RGB -> BGR, ImageNet mean subtracted, 0..255 range) when loading ImageNet
weights; ``fpn_preprocess(backbone)`` returns that mapping for [0, 1] arrays (it is
``backbones.encoder_preprocess`` applied to ``255 * x``). The small backbone takes the images as
they are (identity); apply ``blocks.input_normalization`` before it if exposure varies a lot.

Everything is ``keras.layers``, so it runs on the TensorFlow and JAX backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import keras
import numpy as np
from keras import layers

from kseg.core.errors import ConfigError
from kseg.nn.backbones import build_encoder, encoder_preprocess, load_encoder_weights
from kseg.nn.blocks import check_input_size, residual_block

__all__ = [
    "FPN_BACKBONES",
    "FPN_DIVISOR",
    "FPN_STRIDES",
    "backbone_features",
    "fpn_divisor",
    "fpn_feature_shapes",
    "fpn_preprocess",
    "fpn_pyramid",
    "resnet_fpn_features",
    "small_resnet",
]

FPN_BACKBONES = ("small", "resnet50", "resnet101")
FPN_STRIDES = (4, 8, 16, 32, 64)
"""Strides of P2, P3, P4, P5, P6."""
FPN_DIVISOR = 64
"""Input height and width must be multiples of P6's stride."""
BACKBONE_STRIDES = (4, 8, 16, 32)
"""Strides of C2, C3, C4, C5."""
SMALL_DEFAULT_WIDTH = 8


# ----------------------------------------------------------------------------- sizes, options


def fpn_divisor(**_: Any) -> int:
    """Input height and width must be multiples of this (64, the stride of P6), any backbone."""
    return FPN_DIVISOR


def fpn_feature_shapes(input_size) -> list[tuple[int, int]]:
    """(rows, cols) of P2..P6 for an input size ``n``, ``(h, w)`` or ``(h, w, c)``.

    Raises ``ConfigError`` naming the nearest valid sizes when a side is not a multiple of 64.
    """
    if isinstance(input_size, (int, np.integer)):
        h = w = int(input_size)
    else:
        h, w = (int(s) for s in tuple(input_size)[:2])
    check_input_size(h, w, FPN_DIVISOR, what="FPN input")
    return [(h // s, w // s) for s in FPN_STRIDES]


def _check_backbone(backbone: str) -> None:
    if backbone not in FPN_BACKBONES:
        raise ConfigError(f"unknown FPN backbone {backbone!r}; available: {', '.join(FPN_BACKBONES)}")


def fpn_preprocess(backbone: str) -> Callable[[np.ndarray], np.ndarray]:
    """The input mapping a backbone expects, for float RGB arrays in [0, 1].

    ResNets: a new caffe-scaled array (the argument is left alone); small: the identity.
    """
    _check_backbone(backbone)
    if backbone == "small":
        return encoder_preprocess(None)
    preprocess = encoder_preprocess(backbone)
    return lambda images: preprocess(np.asarray(images, dtype=np.float32) * 255.0)


# ----------------------------------------------------------------------------- backbones


def small_resnet(input_shape: Sequence[int | None], *, width: int = SMALL_DEFAULT_WIDTH,
                 batch_norm: bool = False, name: str = "encoder") -> keras.Model:
    """A tiny ResNet for tests and CPU: outputs C2..C5 (widths w, 2w, 4w, 8w; strides 4..32)."""
    width = int(width)
    if width < 1:
        raise ConfigError(f"width must be >= 1, got {width}")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = layers.Conv2D(width, 3, strides=2, padding="same", use_bias=not batch_norm,
                      kernel_initializer="he_normal", name="stem_conv")(inputs)
    if batch_norm:
        x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    x = layers.MaxPooling2D(2, name="stem_pool")(x)
    features = []
    for k, mult in zip((2, 3, 4, 5), (1, 2, 4, 8)):
        if k > 2:
            x = layers.MaxPooling2D(2, name=f"c{k}_pool")(x)
        x = residual_block(x, width * mult, batch_norm=batch_norm, name=f"c{k}")
        features.append(x)
    return keras.Model(inputs, features, name=name)


def backbone_features(image_tensor, backbone: str = "small", *, width: int | None = None,
                      weights: str | Path | None = None, batch_norm: bool = False) -> list:
    """[C2, C3, C4, C5] (strides 4, 8, 16, 32) of ``image_tensor`` through a nested ``"encoder"``.

    ``width`` and ``batch_norm`` apply to ``"small"`` only; ``weights`` is a local file for the
    encoder (ResNets: a keras.applications include_top=False file).
    """
    _check_backbone(backbone)
    input_shape = tuple(image_tensor.shape[1:])
    if len(input_shape) != 3:
        raise ConfigError(f"the FPN input must be (batch, height, width, channels), got "
                          f"{tuple(image_tensor.shape)}")
    check_input_size(input_shape[0], input_shape[1], FPN_DIVISOR, what="FPN input")
    if backbone == "small":
        encoder = small_resnet(input_shape, width=SMALL_DEFAULT_WIDTH if width is None else width,
                               batch_norm=batch_norm)
        if weights is not None:
            load_encoder_weights(encoder, weights)
        return list(encoder(image_tensor))
    if width is not None or batch_norm:
        raise ConfigError(f"width and batch_norm apply to the 'small' backbone only; {backbone!r} "
                          "is the fixed keras.applications network (with its own BatchNorm)")
    # The FPN's callers scale images themselves (fpn_preprocess), so no in-graph scaling here.
    encoder, strides = build_encoder(backbone, input_shape, depth=5, weights=weights,
                                     scale_inputs=False)
    by_stride = dict(zip(strides, encoder(image_tensor)))
    return [by_stride[s] for s in BACKBONE_STRIDES]


# ----------------------------------------------------------------------------- pyramid


def fpn_pyramid(features: Sequence, *, fpn_channels: int = 256, name: str = "fpn") -> list:
    """[C2, C3, C4, C5] -> [P2, P3, P4, P5, P6], each with ``fpn_channels`` channels.

    Each C_k must have exactly twice the rows and columns of C_{k+1}.
    """
    if len(features) != 4:
        raise ConfigError(f"the FPN takes four backbone maps C2..C5, got {len(features)}")
    fpn_channels = int(fpn_channels)
    if fpn_channels < 1:
        raise ConfigError(f"fpn_channels must be >= 1, got {fpn_channels}")
    c_maps = dict(zip((2, 3, 4, 5), features))
    for k in (2, 3, 4):
        fine, coarse = tuple(c_maps[k].shape[1:3]), tuple(c_maps[k + 1].shape[1:3])
        if None not in fine + coarse and fine != tuple(2 * n for n in coarse):
            raise ConfigError(f"C{k} has size {fine} but C{k + 1} has {coarse}; each level must "
                              f"halve exactly (input sides multiples of {FPN_DIVISOR})")

    top_down = {5: layers.Conv2D(fpn_channels, 1, name=f"{name}_c5p5")(c_maps[5])}
    for k in (4, 3, 2):
        upsampled = layers.UpSampling2D(2, interpolation="nearest",
                                        name=f"{name}_p{k + 1}upsampled")(top_down[k + 1])
        lateral = layers.Conv2D(fpn_channels, 1, name=f"{name}_c{k}p{k}")(c_maps[k])
        top_down[k] = layers.Add(name=f"{name}_p{k}add")([upsampled, lateral])
    outputs = [layers.Conv2D(fpn_channels, 3, padding="same", name=f"{name}_p{k}")(top_down[k])
               for k in (2, 3, 4, 5)]
    outputs.append(layers.MaxPooling2D(pool_size=1, strides=2, name=f"{name}_p6")(outputs[-1]))
    return outputs


def resnet_fpn_features(image_tensor, backbone: str = "small", *, width: int | None = None,
                        weights: str | Path | None = None, fpn_channels: int = 256,
                        batch_norm: bool = False, name: str = "fpn") -> list:
    """[P2, P3, P4, P5, P6] (strides 4, 8, 16, 32, 64) of a (B, H, W, C) image tensor.

    Args:
        image_tensor: a Keras tensor (e.g. ``keras.Input((256, 256, 3))``); H and W must be
            multiples of 64. Scale it with ``fpn_preprocess(backbone)`` (see module notes).
        backbone: ``"small"`` (tests, CPU), ``"resnet50"`` or ``"resnet101"``.
        width: base width of the small backbone (default 8); not for the ResNets.
        weights: local weights file for the backbone (never downloaded).
        fpn_channels: channels of every pyramid level (256 in the paper; e.g. 32 on CPU).
        batch_norm: BatchNorm in the small backbone (off by default).
        name: prefix of the pyramid layers (``fpn_c5p5``, ``fpn_p2``, ..., ``fpn_p6``).
    """
    features = backbone_features(image_tensor, backbone, width=width, weights=weights,
                                 batch_norm=batch_norm)
    return fpn_pyramid(features, fpn_channels=fpn_channels, name=name)
