"""FPN for semantic segmentation: the semantic branch of Kirillov et al.'s Panoptic FPN (2019),
as segmentation_models.pytorch's ``FPN`` builds it.

C2..C5, the encoder's maps at strides 4, 8, 16, 32 (the plain encoder's ``enc2_out``,
``enc3_out``, ``enc4_out`` and ``bottleneck_out`` at depth 5), go through the feature pyramid of
``kseg.nn.fpn.fpn_pyramid`` (``fpn_c5p5``, ``fpn_p4add``, ..., P2..P5 ``fpn_p{k}`` with
``pyramid_filters`` channels; its P6 is not used). Each P_k then reaches stride 4 through k - 2
stages (one for P2) of 3x3 conv -> GroupNorm -> ReLU (``seg_p{k}_{n}``, ``segmentation_filters``
channels) each followed by 2x bilinear upsampling (``seg_p{k}_{n}_up``); with attention each
branch ends in ``seg_p{k}_scse_out``. The four stride-4 maps are merged (``seg_merge``: sum, or
concatenation with ``merge="concat"``), spatially dropped out (``seg_dropout``), mapped to the
output channels by the 1x1 ``head`` and upsampled 4x bilinearly (``head_upsample``) to the
input size. Upsampling the logits rather than the features is the same function (a 1x1
convolution and bilinear interpolation commute) at a fraction of the cost.

GroupNorm as in the paper: 32 groups for the default 128 channels; narrower branches get the
most groups (at most 32) that keep two channels in each (``fpn_groups``), because a one-channel
group on a 1x1 P5 (a 32 px input) normalises a single value to a constant and the branch stops
learning. ``batch_norm`` shapes only the plain encoder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import keras
from keras import layers

from kseg.core.errors import ConfigError
from kseg.nn.blocks import BilinearUpsample, check_input_size
from kseg.nn.fpn import fpn_pyramid
from kseg.nn.registry import register_model
from kseg.tasks.semantic.attention import attend, check_attention
from kseg.tasks.semantic.auxiliary import (
    assemble,
    check_auxiliary,
    classification_output,
)
from kseg.tasks.semantic.decoders import (
    check_dropout,
    check_encoder_options,
    contracting_path,
    image_input,
    require_strides,
)
from kseg.tasks.semantic.heads import AUTO, output_head, resolve_head

FPN_MERGES = ("add", "concat")
FPN_DEPTH = 5
FPN_LEVELS = (2, 3, 4, 5)


def _fpn_divisor(**_: Any) -> int:
    return 2**FPN_DEPTH


def fpn_groups(filters: int) -> int:
    """GroupNorm groups of a branch: a divisor of ``filters``, at most 32, two channels or more each."""
    return math.gcd(32, filters // 2) if filters % 2 == 0 else 1


def segmentation_branch(p, level: int, filters: int, *, name: str):
    """P_level to stride 4: max(1, level - 2) conv-GN-ReLU stages, each but P2's upsampled 2x."""
    n_up = level - 2
    groups = fpn_groups(filters)
    x = p
    for n in range(1, max(1, n_up) + 1):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
                          name=f"{name}_{n}_conv")(x)
        x = layers.GroupNormalization(groups=groups, name=f"{name}_{n}_gn")(x)
        x = layers.Activation("relu", name=f"{name}_{n}_relu")(x)
        if n <= n_up:
            x = BilinearUpsample(2, name=f"{name}_{n}_up")(x)
    return x


@register_model("fpn", divisor=_fpn_divisor)
def fpn(
    input_shape: Sequence[int | None] = (None, None, 3),
    n_classes: int | None = None,
    *,
    targets: str | None = None,
    pyramid_filters: int = 256,
    segmentation_filters: int = 128,
    merge: str = "add",
    dropout: float = 0.2,
    base_filters: int = 16,
    batch_norm: bool = True,
    residual: bool = False,
    attention: str | None = None,
    activation: str | None = AUTO,
    encoder: str | None = None,
    encoder_weights: str | Path | None = None,
    input_norm: str | None = None,
    classification_head: bool = False,
    classification_dropout: float = 0.2,
    name: str = "fpn",
) -> keras.Model:
    """Build the FPN inference model: image (B, H, W, C) -> (B, H, W, n_out); H, W multiples of 32.

    Args:
        pyramid_filters: channels of P2..P5 (256 in the paper).
        segmentation_filters: channels of each semantic branch (128 in the paper).
        merge: ``"add"`` (sum of the four branches, the paper) or ``"concat"``.
        dropout: SpatialDropout2D rate after the merge (SMP's default 0.2).
        attention: None, ``"scse"`` or ``"scse_max"`` at the end of every branch.
        base_filters, batch_norm, residual, input_norm: the plain encoder (five levels, as for
            ``unet`` with depth 5).
        n_classes, targets, activation, encoder, encoder_weights, classification_head,
            classification_dropout: as for ``unet`` (the classification head reads the encoder's
            deepest feature; there is no ``deep_supervision`` here).
    """
    n_out, activation = resolve_head(n_classes, targets, activation)
    check_encoder_options(input_shape, base_filters=base_filters, encoder=encoder,
                          encoder_weights=encoder_weights, input_norm=input_norm)
    check_dropout(dropout)
    check_attention(attention)
    check_auxiliary(0, deep_supervision=False, classification_dropout=classification_dropout, decoder=name)
    if merge not in FPN_MERGES:
        raise ConfigError(f"merge must be 'add' (sum) or 'concat', got {merge!r}")
    for option, value in (("pyramid_filters", pyramid_filters),
                          ("segmentation_filters", segmentation_filters)):
        if int(value) < 1:
            raise ConfigError(f"{option} must be >= 1, got {value}")
    check_input_size(input_shape[0], input_shape[1], 2**FPN_DEPTH, what=f"{name} input")

    inputs = image_input(input_shape)
    skips, bottleneck = contracting_path(inputs, depth=FPN_DEPTH, encoder=encoder,
                                         encoder_weights=encoder_weights,
                                         base_filters=base_filters, batch_norm=batch_norm,
                                         residual=residual, input_norm=input_norm)
    require_strides(skips, (4, 8, 16), decoder="fpn", encoder=encoder)
    c_maps = [skips[4], skips[8], skips[16], bottleneck]
    pyramid = fpn_pyramid(c_maps, fpn_channels=int(pyramid_filters), name="fpn")[:4]

    branches = []
    for level, p in zip(FPN_LEVELS, pyramid):
        x = segmentation_branch(p, level, int(segmentation_filters), name=f"seg_p{level}")
        branches.append(attend(x, attention, name=f"seg_p{level}_scse"))
    merged = (layers.Add if merge == "add" else layers.Concatenate)(name="seg_merge")(branches)
    if dropout:
        merged = layers.SpatialDropout2D(dropout, name="seg_dropout")(merged)
    x = layers.Conv2D(n_out, 1, padding="same", name="head")(merged)
    x = BilinearUpsample(4, name="head_upsample")(x)
    classification = classification_output(bottleneck, classification_dropout) if classification_head else None
    return assemble(inputs, output_head(x, activation), classification=classification, name=name)
