"""U-Net (Ronneberger et al., 2015) with an optional ``keras.applications`` encoder.

Plain U-Net layer names (level i works at stride 2**i): encoder blocks ``enc{i}`` (output
``enc{i}_out``, the skip), ``pool{i}``, ``bottleneck`` (+ ``bottleneck_dropout``), decoder
``up{i}_out`` -> ``concat{i}`` -> ``dec{i}`` and the head ``head`` -> ``logits`` -> ``probs``.
With an encoder the contracting path is the nested model ``"encoder"``
(``model.get_layer("encoder")``, e.g. to freeze it) whose outputs are the skips named in
``kseg.nn.backbones.ENCODERS``; the decoder is the same.

Options shared with the other decoders: ``attention="scse"`` recalibrates every decoder block's
output (``dec{i}_scse_out``, see ``kseg.tasks.semantic.attention``) and ``hypercolumns=True``
concatenates every decoder stage, upsampled to full resolution, before the head
(``hypercolumn``, see ``kseg.tasks.semantic.decoders``). ``deep_supervision`` and
``classification_head`` add training-only outputs (``kseg.tasks.semantic.auxiliary``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import keras
from keras import layers

from kseg.nn.backbones import encoder_max_depth
from kseg.nn.blocks import upsample_block
from kseg.nn.registry import register_model
from kseg.tasks.semantic.attention import attend, check_attention
from kseg.tasks.semantic.auxiliary import with_stage_auxiliary
from kseg.tasks.semantic.decoders import (
    check_dropout,
    check_encoder_options,
    check_upsampling,
    contract,
    conv_unit,
    hypercolumn,
)
from kseg.tasks.semantic.heads import AUTO, resolve_head, segmentation_head


def unet_depth(depth: int | None = None, encoder: str | None = None) -> int:
    """The depth actually used: 4 for the plain U-Net, 5 (stride 32) with an encoder."""
    if depth is None:
        return 4 if encoder is None else encoder_max_depth(encoder)
    return int(depth)


def unet_divisor(depth: int | None = None, encoder: str | None = None, **_: Any) -> int:
    """Input height and width must be multiples of 2**depth."""
    return 2 ** unet_depth(depth, encoder)


@register_model("unet", divisor=unet_divisor)
def unet(
    input_shape: Sequence[int | None] = (None, None, 3),
    n_classes: int | None = None,
    *,
    targets: str | None = None,
    depth: int | None = None,
    base_filters: int = 16,
    batch_norm: bool = True,
    dropout: float = 0.0,
    upsampling: str = "transpose",
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
    name: str = "unet",
) -> keras.Model:
    """Build the U-Net inference model: image (B, H, W, C) -> per-pixel output (B, H, W, n_out).

    Args:
        input_shape: (H, W, C); H and W may be None (any multiple of 2**depth at run time).
        n_classes: output channels (default 1). For softmax, count the background class.
        targets: multi-label alternative to n_classes, e.g. ``"mask+border"`` (2 sigmoid
            channels in that order, see ``kseg.tasks.semantic.heads.TARGET_NAMES``).
        depth: number of 2x downsamplings; default 4, or 5 with an encoder (at most 5 there).
        base_filters: filters at full resolution; level i uses base_filters * 2**i (also the
            decoder widths with an encoder: 16 -> 256, 128, 64, 32, 16).
        batch_norm: BatchNorm after every convolution of the plain encoder and the decoder.
        dropout: Dropout rate at the end of the contracting path (the bottleneck), as in the
            paper.
        upsampling: ``"transpose"`` (2x2 up-convolution) or ``"bilinear"`` (+ 1x1 conv).
        residual: residual blocks instead of plain double convolutions.
        attention: None, ``"scse"`` or ``"scse_max"``: squeeze & excitation after each decoder
            block (``kseg.tasks.semantic.attention``).
        hypercolumns: concatenate all decoder stages at full resolution before the head.
        activation: ``"auto"`` (sigmoid for one channel or ``targets``, softmax otherwise),
            ``"sigmoid"``, ``"softmax"`` or None (the model then outputs ``"logits"``).
        encoder: None, a ``kseg.nn.backbones.ENCODERS`` name (``"resnet50"``,
            ``"efficientnetb0"``, ...) or ``"keras_hub:<preset folder>"``; it takes the [0, 1]
            images and normalises them inside as its weights expect.
        encoder_weights: local weights file for the encoder (include_top=False); never
            downloaded.
        input_norm: None (inputs as given) or ``"image"`` (each image standardised per channel
            by an ``ImageStandardization`` layer; plain encoder only).
        deep_supervision: also output an auxiliary head per decoder stage above full resolution
            (``aux1`` at the deepest), for the training loss only
            (``kseg.tasks.semantic.auxiliary``; the model then has several outputs).
        classification_head: also output ``classification``, the probability that the image
            holds any foreground, from the bottleneck.
        classification_dropout: Dropout rate before the classification head's dense unit.
    """
    n_out, activation = resolve_head(n_classes, targets, activation)
    check_encoder_options(input_shape, base_filters=base_filters, encoder=encoder,
                          encoder_weights=encoder_weights, input_norm=input_norm)
    check_upsampling(upsampling)
    check_dropout(dropout)
    check_attention(attention)
    depth = unet_depth(depth, encoder)
    block = conv_unit(residual)
    contracted = contract(input_shape, depth=depth, name=name, encoder=encoder, encoder_weights=encoder_weights,
                          base_filters=base_filters, batch_norm=batch_norm, residual=residual,
                          input_norm=input_norm, dropout=dropout)
    inputs, skips, deepest = contracted.inputs, contracted.skips, contracted.deepest
    x = contracted.bottleneck

    stages: dict[int, Any] = {}
    for i in reversed(range(depth)):
        filters = base_filters * 2**i
        x = upsample_block(x, filters, mode=upsampling, name=f"up{i}")
        if 2**i in skips:
            x = layers.Concatenate(name=f"concat{i}")([x, skips[2**i]])
        x = block(x, filters, batch_norm=batch_norm, name=f"dec{i}")
        x = attend(x, attention, name=f"dec{i}_scse")
        stages[2**i] = x

    if hypercolumns:
        x = hypercolumn(stages)
    outputs = segmentation_head(x, n_out, activation)
    return with_stage_auxiliary(inputs, outputs, stages, deepest, n_out, activation, name=name,
                                deep_supervision=deep_supervision, classification_head=classification_head,
                                classification_dropout=classification_dropout)
