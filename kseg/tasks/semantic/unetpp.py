"""U-Net++ (Zhou et al., 2018): U-Net whose skips are nested, dense convolution pathways.

Node X^{i,j} works at level i (stride 2**i), column j; X^{i,0} is the encoder's feature (the
plain encoder's ``enc{i}_out``, the bottleneck for i = depth) and for j >= 1

    X^{i,j} = H([X^{i,0}, ..., X^{i,j-1}, U(X^{i+1,j-1})])

with U the 2x upsampling (``x{i}_{j}_up_out``), the concatenation ``x{i}_{j}_concat`` and H a
double convolution ``x{i}_{j}`` (output ``x{i}_{j}_out``; with attention
``x{i}_{j}_scse_out``). The decoding path X^{depth-1,1}, ..., X^{0,depth} ends at full
resolution in the head. Every node at level i has base_filters * 2**i filters: the diagonal
nodes therefore have segmentation_models.pytorch's decoder widths (256, 128, 64, 32, 16 for
base 16 and depth 5), and the inner nodes the width of their level as in the paper (SMP gives
them the encoder's channel count instead, which is 4-8x wider on a ResNet-50).

An encoder without a feature at some shallow level (ResNets have none at stride 1) leaves that
level out of the nested grid: below the shallowest run of encoder features the path continues
as plain U-Net nodes (upsample, then H). The head reads X^{0,depth}; ``deep_supervision`` adds
Zhou et al.'s auxiliary heads on X^{0,1}, ..., X^{0,depth-1} (on the decoding path's
X^{i,depth-i}, i >= 1, when the grid has no level 0), for the training loss only
(``kseg.tasks.semantic.auxiliary``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import keras
from keras import layers

from kseg.nn.blocks import upsample_block
from kseg.nn.registry import register_model
from kseg.tasks.semantic.attention import attend, check_attention
from kseg.tasks.semantic.auxiliary import (
    assemble,
    check_auxiliary,
    classification_output,
    deep_supervision_heads,
)
from kseg.tasks.semantic.decoders import (
    check_dropout,
    check_encoder_options,
    check_upsampling,
    contract,
    conv_unit,
    hypercolumn,
)
from kseg.tasks.semantic.heads import AUTO, resolve_head, segmentation_head
from kseg.tasks.semantic.unet import unet_depth, unet_divisor


def nested_nodes(depth: int, encoder_levels: set[int]) -> list[tuple[int, int]]:
    """The decoder nodes (i, j), j >= 1, in the order they are built (column by column).

    The grid spans the levels from the shallowest unbroken run of encoder features down to the
    bottleneck; shallower levels only get their node on the decoding path (i + j = depth).
    """
    top = depth
    while top - 1 in encoder_levels:
        top -= 1
    return [(i, j) for j in range(1, depth + 1) for i in reversed(range(depth - j + 1))
            if i >= top or i + j == depth]


@register_model("unetpp", divisor=unet_divisor)
def unetpp(
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
    name: str = "unetpp",
) -> keras.Model:
    """Build the U-Net++ inference model: image (B, H, W, C) -> (B, H, W, n_out).

    The options are ``unet``'s (``kseg.tasks.semantic.unet``); ``hypercolumns`` concatenates the
    decoding path's nodes X^{i,depth-i} at full resolution before the head; ``deep_supervision``
    supervises the nodes X^{0,j}, j < depth (see the module notes).
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
    bottleneck = contracted.bottleneck
    nodes: dict[tuple[int, int], Any] = {(i, 0): skips[2**i] for i in range(depth) if 2**i in skips}
    nodes[(depth, 0)] = bottleneck

    for i, j in nested_nodes(depth, {i for i, _ in nodes if i < depth}):
        filters = base_filters * 2**i
        up = upsample_block(nodes[(i + 1, j - 1)], filters, mode=upsampling, name=f"x{i}_{j}_up")
        same_level = [nodes[(i, k)] for k in range(j) if (i, k) in nodes]
        x = layers.Concatenate(name=f"x{i}_{j}_concat")([*same_level, up]) if same_level else up
        x = block(x, filters, batch_norm=batch_norm, name=f"x{i}_{j}")
        nodes[(i, j)] = attend(x, attention, name=f"x{i}_{j}_scse")

    x = nodes[(0, depth)]
    if hypercolumns:
        x = hypercolumn({2**i: nodes[(i, depth - i)] for i in range(depth)})
    outputs = segmentation_head(x, n_out, activation)
    supervised = [(1, nodes[(0, j)]) for j in range(1, depth) if (0, j) in nodes]
    if not supervised:
        supervised = [(2**i, nodes[(i, depth - i)]) for i in reversed(range(1, depth))]
    check_auxiliary(len(supervised), deep_supervision=deep_supervision,
                    classification_dropout=classification_dropout, decoder=name)
    auxiliary = deep_supervision_heads(supervised, n_out, activation) if deep_supervision else []
    classification = classification_output(deepest, classification_dropout) if classification_head else None
    return assemble(inputs, outputs, auxiliary, classification, name=name)
