"""DeepLabV3+ (Chen et al., ECCV 2018): atrous spatial pyramid pooling on stride-16 features, and
a decoder that refines it with stride-4 features.

The encoder stops at stride 16 (output stride 16; the plain encoder has four levels, the
bottleneck at stride 16). ASPP on it, each branch ``aspp_filters`` channels:
``aspp_1x1`` (1x1 conv-BN-ReLU), ``aspp_atrous{k}`` (3x3 conv-BN-ReLU with dilation
``atrous_rates[k-1]``; the paper's 6, 12, 18 for output stride 16) and the image-pooling branch
(``aspp_pool``: the mean over all pixels, 1x1 conv ``aspp_pool_conv`` + ReLU, repeated at every
pixel by ``aspp_pool_out``, which works for any H and W). Their concatenation
``aspp_concat`` is projected by a 1x1 conv-BN-ReLU (``aspp_project``), dropped out
(``aspp_dropout``) and upsampled 4x bilinearly (``aspp_upsample``). The encoder's stride-4
feature is projected to ``low_level_filters`` (48) channels (``low_level``), concatenated
(``decoder_concat``), refined by two 3x3 conv-BN-ReLU (``decoder_1``, ``decoder_2``, output
``decoder_out``; attention ``decoder_scse_out``), mapped by the 1x1 ``head`` and upsampled 4x
(``head_upsample``).

The image-pooling branch has no BatchNorm (its 1x1 conv has a bias instead), unlike the paper
and segmentation_models.pytorch: it sees one value per channel and image, so BatchNorm's batch
statistics there come from B numbers. With batch size 1 the normalised output is the constant
beta (the branch gets no gradient) and the moving variance is pulled towards 0, which blows the
branch up at inference (PyTorch refuses batch 1 there outright).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import keras
from keras import layers

from kseg.core.errors import ConfigError
from kseg.nn.blocks import BilinearUpsample, check_input_size, conv_bn_relu, conv_block
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

DEEPLAB_OUTPUT_STRIDE = 16
DEEPLAB_RATES = (6, 12, 18)


def _deeplab_divisor(**_: Any) -> int:
    return DEEPLAB_OUTPUT_STRIDE


@keras.saving.register_keras_serializable(package="kseg")
class SpatialBroadcast(layers.Layer):
    """[(B, 1, 1, C) image-level features, (B, H, W, *) reference] -> (B, H, W, C).

    Bilinear resizing of a 1x1 map is this repetition; as a layer it needs no static H and W.
    """

    def call(self, inputs):
        pooled, reference = inputs
        return pooled * keras.ops.ones_like(reference[..., :1], dtype=pooled.dtype)

    def compute_output_shape(self, input_shapes):
        pooled, reference = input_shapes
        return (*reference[:-1], pooled[-1])


def aspp(x, filters: int, rates: Sequence[int], *, batch_norm: bool = True, dropout: float = 0.0,
         name: str = "aspp"):
    """Atrous spatial pyramid pooling: 1x1, atrous 3x3 per rate, image pooling; 1x1 projection."""
    branches = [conv_bn_relu(x, filters, 1, batch_norm=batch_norm, name=f"{name}_1x1")]
    for k, rate in enumerate(rates, start=1):
        y = layers.Conv2D(filters, 3, padding="same", dilation_rate=int(rate), use_bias=not batch_norm,
                          kernel_initializer="he_normal", name=f"{name}_atrous{k}_conv")(x)
        if batch_norm:
            y = layers.BatchNormalization(name=f"{name}_atrous{k}_bn")(y)
        branches.append(layers.Activation("relu", name=f"{name}_atrous{k}_relu")(y))
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool")(x)
    pooled = layers.Conv2D(filters, 1, kernel_initializer="he_normal", name=f"{name}_pool_conv")(pooled)
    pooled = layers.Activation("relu", name=f"{name}_pool_relu")(pooled)
    branches.append(SpatialBroadcast(name=f"{name}_pool_out")([pooled, x]))
    y = layers.Concatenate(name=f"{name}_concat")(branches)
    y = conv_bn_relu(y, filters, 1, batch_norm=batch_norm, name=f"{name}_project")
    if dropout:
        y = layers.Dropout(dropout, name=f"{name}_dropout")(y)
    return y


def _check_rates(atrous_rates) -> tuple[int, ...]:
    try:
        rates = tuple(int(r) for r in atrous_rates)
        ok = len(rates) > 0 and min(rates) >= 1 and all(float(r) == int(r) for r in atrous_rates)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(
            f"atrous_rates must be positive integers, e.g. {DEEPLAB_RATES} (output stride 16) or "
            f"smaller ones for small feature maps, got {atrous_rates!r}"
        )
    return rates


@register_model("deeplabv3plus", divisor=_deeplab_divisor)
def deeplabv3plus(
    input_shape: Sequence[int | None] = (None, None, 3),
    n_classes: int | None = None,
    *,
    targets: str | None = None,
    atrous_rates: Sequence[int] = DEEPLAB_RATES,
    aspp_filters: int = 256,
    low_level_filters: int = 48,
    decoder_filters: int = 256,
    dropout: float = 0.1,
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
    name: str = "deeplabv3plus",
) -> keras.Model:
    """Build the DeepLabV3+ inference model: image (B, H, W, C) -> (B, H, W, n_out); H, W
    multiples of 16.

    Args:
        atrous_rates: dilation of each atrous ASPP branch (one branch per rate).
        aspp_filters: channels of every ASPP branch and of its projection (256 in the paper).
        low_level_filters: channels the stride-4 feature is projected to (48 in the paper).
        decoder_filters: channels of the two 3x3 decoder convolutions (256 in the paper).
        dropout: Dropout rate after the ASPP projection.
        batch_norm: BatchNorm in the plain encoder, ASPP (but its pooling branch) and decoder.
        attention: None, ``"scse"`` or ``"scse_max"`` after the decoder convolutions.
        base_filters, residual, input_norm: the plain encoder (four levels, as ``unet``).
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
    rates = _check_rates(atrous_rates)
    for option, value in (("aspp_filters", aspp_filters), ("low_level_filters", low_level_filters),
                          ("decoder_filters", decoder_filters)):
        if int(value) < 1:
            raise ConfigError(f"{option} must be >= 1, got {value}")
    check_input_size(input_shape[0], input_shape[1], DEEPLAB_OUTPUT_STRIDE, what=f"{name} input")

    inputs = image_input(input_shape)
    depth = DEEPLAB_OUTPUT_STRIDE.bit_length() - 1
    skips, x = contracting_path(inputs, depth=depth, encoder=encoder, encoder_weights=encoder_weights,
                                base_filters=base_filters, batch_norm=batch_norm, residual=residual,
                                input_norm=input_norm)
    require_strides(skips, (4,), decoder="deeplabv3plus", encoder=encoder)
    classification = classification_output(x, classification_dropout) if classification_head else None
    x = aspp(x, int(aspp_filters), rates, batch_norm=batch_norm, dropout=float(dropout))
    x = BilinearUpsample(4, name="aspp_upsample")(x)
    low = conv_bn_relu(skips[4], int(low_level_filters), 1, batch_norm=batch_norm, name="low_level")
    x = layers.Concatenate(name="decoder_concat")([x, low])
    x = conv_block(x, int(decoder_filters), batch_norm=batch_norm, name="decoder")
    x = attend(x, attention, name="decoder_scse")
    x = layers.Conv2D(n_out, 1, padding="same", name="head")(x)
    x = BilinearUpsample(4, name="head_upsample")(x)
    return assemble(inputs, output_head(x, activation), classification=classification, name=name)
