"""LinkNet (Chaurasia & Culurciello, 2017): a light decoder whose skips are added, not concatenated.

Decoder block ``dec{i}`` (level i, stride 2**i) on the map x from level i + 1 with C channels:
1x1 conv to C/4 (``dec{i}_reduce_*``), 3x3 transposed conv with stride 2 to C/4
(``dec{i}_up_*``), 1x1 conv to the skip's channel count (``dec{i}_expand_*``, output
``dec{i}_out``); each followed by BatchNorm (``batch_norm``) and ReLU. The skip is then added:
``add{i}`` = ``dec{i}_out`` + skip. A level without an encoder feature (a ResNet has none at
stride 1) gets no addition and base_filters * 2**i channels (segmentation_models.pytorch uses
32 at full resolution). Attention (``dec{i}_scse_out``) follows the addition.

Keeping the widths of the encoder and adding instead of concatenating is what makes the decoder
cheap: the paper's point for real-time use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import keras
from keras import layers

from kseg.nn.blocks import conv_bn_relu
from kseg.nn.registry import register_model
from kseg.tasks.semantic.attention import attend, check_attention
from kseg.tasks.semantic.auxiliary import with_stage_auxiliary
from kseg.tasks.semantic.decoders import (
    check_dropout,
    check_encoder_options,
    contract,
    hypercolumn,
)
from kseg.tasks.semantic.heads import AUTO, resolve_head, segmentation_head
from kseg.tasks.semantic.unet import unet_depth, unet_divisor


def linknet_block(x, filters: int, *, batch_norm: bool = True, name: str):
    """1x1 (C/4) -> transposed 3x3 stride 2 (C/4) -> 1x1 (filters); output ``{name}_out``."""
    mid = max(1, int(x.shape[-1]) // 4)
    x = conv_bn_relu(x, mid, 1, batch_norm=batch_norm, name=f"{name}_reduce")
    x = layers.Conv2DTranspose(mid, 3, strides=2, padding="same", use_bias=not batch_norm,
                               kernel_initializer="he_normal", name=f"{name}_up_conv")(x)
    if batch_norm:
        x = layers.BatchNormalization(name=f"{name}_up_bn")(x)
    x = layers.Activation("relu", name=f"{name}_up_relu")(x)
    return conv_bn_relu(x, filters, 1, batch_norm=batch_norm, name=f"{name}_expand",
                        act_name=f"{name}_out")


@register_model("linknet", divisor=unet_divisor)
def linknet(
    input_shape: Sequence[int | None] = (None, None, 3),
    n_classes: int | None = None,
    *,
    targets: str | None = None,
    depth: int | None = None,
    base_filters: int = 16,
    batch_norm: bool = True,
    dropout: float = 0.0,
    residual: bool = False,
    attention: str | None = None,
    hypercolumns: bool = False,
    activation: str | None = AUTO,
    encoder: str | None = None,
    encoder_weights: str | Path | None = None,
    input_norm: str | None = None,
    deep_supervision: bool = False,
    classification_head: bool = False,
    classification_dropout: float = 0.2,
    name: str = "linknet",
) -> keras.Model:
    """Build the LinkNet inference model: image (B, H, W, C) -> (B, H, W, n_out).

    Options as for ``unet`` (``depth``, ``base_filters``, ``residual`` shape the plain encoder;
    ``dropout`` acts on the bottleneck); ``hypercolumns`` concatenates every level's output
    (``add{i}`` or its attention) at full resolution before the head; ``deep_supervision``
    supervises every level but the last, as ``unet`` does.
    """
    n_out, activation = resolve_head(n_classes, targets, activation)
    check_encoder_options(input_shape, base_filters=base_filters, encoder=encoder,
                          encoder_weights=encoder_weights, input_norm=input_norm)
    check_dropout(dropout)
    check_attention(attention)
    depth = unet_depth(depth, encoder)
    contracted = contract(input_shape, depth=depth, name=name, encoder=encoder, encoder_weights=encoder_weights,
                          base_filters=base_filters, batch_norm=batch_norm, residual=residual,
                          input_norm=input_norm, dropout=dropout)
    inputs, skips, deepest = contracted.inputs, contracted.skips, contracted.deepest
    x = contracted.bottleneck

    stages: dict[int, Any] = {}
    for i in reversed(range(depth)):
        skip = skips.get(2**i)
        filters = base_filters * 2**i if skip is None else int(skip.shape[-1])
        x = linknet_block(x, filters, batch_norm=batch_norm, name=f"dec{i}")
        if skip is not None:
            x = layers.Add(name=f"add{i}")([x, skip])
        x = attend(x, attention, name=f"dec{i}_scse")
        stages[2**i] = x

    if hypercolumns:
        x = hypercolumn(stages)
    outputs = segmentation_head(x, n_out, activation)
    return with_stage_auxiliary(inputs, outputs, stages, deepest, n_out, activation, name=name,
                                deep_supervision=deep_supervision, classification_head=classification_head,
                                classification_dropout=classification_dropout)
