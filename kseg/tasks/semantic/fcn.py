"""FCN-32s / 16s / 8s (Long, Shelhamer & Darrell, 2015) on a VGG16-style backbone.

Layer names follow the reference Caffe models: backbone ``block{i}_conv{j}`` / ``block{i}_pool``
(as keras.applications.VGG16), ``fc6``/``fc7`` as convolutions, 1x1 score layers
``score_fr``, ``score_pool4``, ``score_pool3`` (zero-initialised), 2x transposed convolutions
``upscore2``, ``upscore_pool4`` (bilinear-initialised, learnable), sums ``fuse_pool4``,
``fuse_pool3`` and the final upsampling ``upscore32`` / ``upscore16`` / ``upscore8``
(bilinear, kept fixed as in the paper), then ``logits`` -> ``probs``.

With 'same' padding and inputs divisible by 32 the skip maps align exactly, so no cropping
layers are needed; fixed input sizes are checked at build time.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

import keras
from keras import layers

from kseg.core.errors import ConfigError
from kseg.nn.backbones import VGG16_CONVS, copy_vgg16_weights, vgg_backbone
from kseg.nn.blocks import (
    BilinearUpsampleInitializer,
    check_input_size,
    input_normalization,
)
from kseg.nn.registry import register_model
from kseg.tasks.semantic.heads import AUTO, output_head, resolve_head

FCN_VARIANTS = ("32s", "16s", "8s")
FCN_DIVISOR = 32


def _upscore(x, n_out: int, stride: int, *, name: str, trainable: bool = True):
    """Transposed conv (kernel 2*stride, 'same') initialised to bilinear upsampling by stride."""
    up = layers.Conv2DTranspose(
        n_out, 2 * stride, strides=stride, padding="same", use_bias=False,
        kernel_initializer=BilinearUpsampleInitializer(), name=name,
    )
    up.trainable = trainable
    return up(x)


def _score(x, n_out: int, name: str):
    return layers.Conv2D(n_out, 1, padding="same", kernel_initializer="zeros", name=name)(x)


def fcn(
    input_shape: Sequence[int | None] = (None, None, 3),
    n_classes: int | None = None,
    *,
    targets: str | None = None,
    variant: str = "8s",
    width: int = 64,
    convs_per_block: Sequence[int] = VGG16_CONVS,
    fc_width: int | None = None,
    fc_kernel: int = 7,
    dropout: float = 0.5,
    batch_norm: bool = False,
    activation: str | None = AUTO,
    encoder_weights: str | Path | None = None,
    input_norm: str | None = None,
    name: str | None = None,
) -> keras.Model:
    """Build the FCN inference model: image (B, H, W, C) -> per-pixel output (B, H, W, n_out).

    Args:
        input_shape: (H, W, C); H and W may be None (multiples of 32 at run time).
        n_classes / targets / activation: as for ``unet`` (see ``kseg.nn.blocks``).
        variant: ``"32s"`` (no skips), ``"16s"`` (+ pool4) or ``"8s"`` (+ pool4, pool3).
        width: channels of the first block; 64 (and the default convs_per_block) is VGG16.
        convs_per_block: 3x3 convolutions in each of the five blocks (VGG16: 2, 2, 3, 3, 3).
        fc_width: channels of fc6/fc7 (default 64 * width: 4096 for VGG16).
        fc_kernel: fc6 kernel size (7 in the paper).
        dropout: rate after fc6 and fc7 (0.5 in the paper).
        batch_norm: BatchNorm in the backbone (for training from scratch; not VGG16 weights).
        encoder_weights: local VGG16 (include_top=False) weights file copied into the
            backbone by layer name; needs width=64, default convs_per_block, no batch norm.
        input_norm: None or ``"image"`` (per-image standardisation, see ``unet``).
    """
    if variant not in FCN_VARIANTS:
        raise ConfigError(f"FCN variant must be one of {', '.join(FCN_VARIANTS)}, got {variant!r}")
    n_out, activation = resolve_head(n_classes, targets, activation)
    if len(input_shape) != 3:
        raise ConfigError(f"input_shape must be (height, width, channels), got {input_shape}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    name = name or f"fcn{variant}"
    check_input_size(input_shape[0], input_shape[1], FCN_DIVISOR, what=f"{name} input")
    if encoder_weights is not None and batch_norm:
        raise ConfigError("VGG16 encoder_weights cannot be loaded into a batch-norm backbone")
    fc_width = int(fc_width or 64 * width)

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    feats = vgg_backbone(input_normalization(inputs, input_norm), width=width, convs_per_block=convs_per_block,
                         batch_norm=batch_norm)
    x = layers.Conv2D(fc_width, fc_kernel, padding="same", activation="relu",
                      name="fc6")(feats["block5_pool"])
    if dropout:
        x = layers.Dropout(dropout, name="drop6")(x)
    x = layers.Conv2D(fc_width, 1, padding="same", activation="relu", name="fc7")(x)
    if dropout:
        x = layers.Dropout(dropout, name="drop7")(x)
    score = _score(x, n_out, "score_fr")

    if variant == "32s":
        score = _upscore(score, n_out, 32, name="upscore32", trainable=False)
    else:
        score = _upscore(score, n_out, 2, name="upscore2")
        pool4 = _score(feats["block4_pool"], n_out, "score_pool4")
        score = layers.Add(name="fuse_pool4")([score, pool4])
        if variant == "16s":
            score = _upscore(score, n_out, 16, name="upscore16", trainable=False)
        else:
            score = _upscore(score, n_out, 2, name="upscore_pool4")
            pool3 = _score(feats["block3_pool"], n_out, "score_pool3")
            score = layers.Add(name="fuse_pool3")([score, pool3])
            score = _upscore(score, n_out, 8, name="upscore8", trainable=False)

    model = keras.Model(inputs, output_head(score, activation), name=name)
    if encoder_weights is not None:
        copy_vgg16_weights(model, encoder_weights, input_channels=int(input_shape[-1]))
    return model


def _fcn_divisor(**_: Any) -> int:
    return FCN_DIVISOR


register_model("fcn", divisor=_fcn_divisor)(fcn)


def _fixed_variant(variant: str):
    """A builder equal to ``fcn`` with ``variant`` fixed (its signature omits ``variant``)."""

    def builder(*args: Any, **kwargs: Any) -> keras.Model:
        return fcn(*args, variant=variant, **kwargs)

    signature = inspect.signature(fcn)
    builder.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if p.name != "variant"]
    )
    builder.__name__ = builder.__qualname__ = f"fcn{variant}"
    builder.__doc__ = f"FCN-{variant}: ``fcn(variant={variant!r})``."
    return builder


fcn32s = register_model("fcn32s", divisor=_fcn_divisor)(_fixed_variant("32s"))
fcn16s = register_model("fcn16s", divisor=_fcn_divisor)(_fixed_variant("16s"))
fcn8s = register_model("fcn8s", divisor=_fcn_divisor)(_fixed_variant("8s"))
