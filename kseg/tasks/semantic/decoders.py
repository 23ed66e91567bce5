"""What the semantic decoders share: the contracting path (the plain U-Net encoder or a
``kseg.nn.backbones`` encoder), the checks of the options that choose it, and hypercolumns.

Every decoder (``unet``, ``unetpp``, ``fpn``, ``deeplabv3plus``, ``linknet``) reads its skips
from ``contracting_path``, so ``encoder=None`` means the same plain encoder everywhere and an
encoder name means the same nested ``"encoder"`` model (``model.get_layer("encoder")``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import keras
from keras import layers

from kseg.core.errors import ConfigError
from kseg.nn.backbones import build_encoder
from kseg.nn.blocks import (
    BilinearUpsample,
    check_input_size,
    conv_block,
    input_normalization,
    residual_block,
)


def check_encoder_options(
    input_shape: Sequence[int | None],
    *,
    base_filters: int,
    encoder: str | None,
    encoder_weights: str | Path | None,
    input_norm: str | None,
) -> None:
    """ConfigError for options no decoder can build: bad shape or width, or a mismatched encoder."""
    if len(input_shape) != 3:
        raise ConfigError(f"input_shape must be (height, width, channels), got {input_shape}")
    if int(base_filters) < 1:
        raise ConfigError(f"base_filters must be >= 1, got {base_filters}")
    if input_norm is not None and encoder is not None:
        raise ConfigError(
            "input_norm applies to the plain encoder (encoder=None); an encoder scales its input "
            "inside the model as its weights expect (kseg.nn.input_scaling)"
        )
    if encoder_weights is not None and encoder is None:
        raise ConfigError("encoder_weights needs an encoder, e.g. encoder='resnet50' (names: "
                          "kseg.nn.backbones.ENCODERS)")


def conv_unit(residual: bool) -> Callable[..., Any]:
    """The convolution block of the plain encoder and the U-Net-like decoders."""
    return residual_block if residual else conv_block


def contracting_path(
    inputs,
    *,
    depth: int,
    encoder: str | None = None,
    encoder_weights: str | Path | None = None,
    base_filters: int = 16,
    batch_norm: bool = True,
    residual: bool = False,
    input_norm: str | None = None,
) -> tuple[dict[int, Any], Any]:
    """Skip features by stride (strides below ``2**depth``) and the bottleneck at ``2**depth``.

    ``encoder=None``: the plain U-Net encoder, level i (stride 2**i) a double convolution
    ``enc{i}`` with base_filters * 2**i filters (its output ``enc{i}_out`` is the skip), 2x2 max
    pooling ``pool{i}``, and the ``bottleneck`` block with base_filters * 2**depth filters.
    Otherwise the nested ``build_encoder`` model; it may give no skip at some strides (ResNets
    have none at stride 1), which the decoders allow for.
    """
    skips: dict[int, Any] = {}
    if encoder is None:
        block = conv_unit(residual)
        x = input_normalization(inputs, input_norm)
        for i in range(depth):
            x = block(x, base_filters * 2**i, batch_norm=batch_norm, name=f"enc{i}")
            skips[2**i] = x
            x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
        return skips, block(x, base_filters * 2**depth, batch_norm=batch_norm, name="bottleneck")
    enc_model, strides = build_encoder(encoder, tuple(inputs.shape[1:]), depth=depth,
                                       weights=encoder_weights)
    feats = enc_model(inputs)
    for stride, feat in zip(strides[:-1], feats[:-1]):
        skips[stride] = feat
    return skips, feats[-1]


def require_strides(skips: dict[int, Any], strides: Sequence[int], *, decoder: str,
                    encoder: str | None) -> None:
    """ConfigError when the encoder gives no feature map at a stride the decoder reads."""
    missing = [s for s in strides if s not in skips]
    if missing:
        raise ConfigError(
            f"{decoder} needs encoder features at strides {', '.join(map(str, strides))}; encoder "
            f"{encoder!r} has none at {', '.join(map(str, missing))} (it gives "
            f"{', '.join(map(str, sorted(skips)))}); use encoder=None or another encoder"
        )


def hypercolumn(stages: dict[int, Any], *, name: str = "hypercolumn"):
    """Decoder stage outputs (by stride) upsampled bilinearly to full resolution, concatenated.

    The head then sees coarse context and fine detail side by side (the TGS Salt winners'
    hypercolumns); layers ``{name}_up{stride}`` and the concatenation ``{name}``.
    """
    parts = []
    for stride in sorted(stages):
        x = stages[stride]
        if stride > 1:
            x = BilinearUpsample(stride, name=f"{name}_up{stride}")(x)
        parts.append(x)
    if len(parts) == 1:
        return parts[0]
    return layers.Concatenate(name=name)(parts)


def check_dropout(dropout: float, what: str = "dropout") -> None:
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"{what} must be in [0, 1), got {dropout}")


def check_upsampling(upsampling: str) -> None:
    if upsampling not in ("transpose", "bilinear"):
        raise ConfigError(f"upsampling must be 'transpose' or 'bilinear', got {upsampling!r}")


def image_input(input_shape: Sequence[int | None]) -> keras.KerasTensor:
    """The ``"image"`` input every semantic model takes."""
    return keras.Input(shape=tuple(input_shape), name="image")


@dataclass
class Contracted:
    """The contracting half of a U-Net-like model: input, skips by stride, the (dropped-out)
    bottleneck the decoder starts from, and the bottleneck before dropout (classification head)."""

    inputs: Any
    skips: dict[int, Any]
    bottleneck: Any
    deepest: Any


def contract(input_shape: Sequence[int | None], *, depth: int, name: str, encoder: str | None,
             encoder_weights: str | Path | None, base_filters: int, batch_norm: bool, residual: bool,
             input_norm: str | None, dropout: float) -> Contracted:
    """Check the resolved ``depth`` and the input size, then build the input, the contracting path
    and the bottleneck dropout (``bottleneck_dropout``) of ``unet``, ``unetpp`` and ``linknet``."""
    if depth < 1:
        raise ConfigError(f"depth must be >= 1, got {depth}")
    check_input_size(input_shape[0], input_shape[1], 2**depth, what=f"{name} input")
    inputs = image_input(input_shape)
    skips, x = contracting_path(inputs, depth=depth, encoder=encoder, encoder_weights=encoder_weights,
                                base_filters=base_filters, batch_norm=batch_norm, residual=residual,
                                input_norm=input_norm)
    deepest = x
    if dropout:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
    return Contracted(inputs, skips, x, deepest)
