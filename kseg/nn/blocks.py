"""Building blocks shared by the segmentation builders.

Owns the conv-BN-ReLU, residual and upsampling blocks, the output head and its conventions
(channel targets, activation, float32 output), the bilinear transposed-convolution initializer
and the input-size check. Everything is ``keras.layers`` / ``keras.ops`` so it runs on the
TensorFlow and JAX backends alike.

Layer names: a block called with ``name="enc1"`` creates ``enc1_1_conv``, ``enc1_1_bn``,
``enc1_1_relu``, ... and always ends in a layer named ``enc1_out``, so skip connections and
feature maps can be picked by name.

Output convention (every semantic builder):
    head conv (``"head"``, n_out channels, compute dtype)
      -> ``"logits"``: linear Activation, float32 even under mixed precision
      -> ``"probs"``: sigmoid or softmax Activation, float32 (absent when activation=None)
The model output is ``"probs"`` (or ``"logits"`` when activation=None); a loss that wants
logits for numerical stability takes ``model.get_layer("logits").output``.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
from keras import layers

from kseg.core.errors import ConfigError


def _divisor_text(divisor: int) -> str:
    if divisor > 1 and divisor & (divisor - 1) == 0:
        return f"2**{divisor.bit_length() - 1}={divisor}"
    return str(divisor)


def nearest_valid_sizes(n: int, divisor: int) -> tuple[int, ...]:
    """The multiples of ``divisor`` just below and above ``n`` (only positive ones)."""
    lower = (n // divisor) * divisor
    if lower == n:
        return (n,)
    return tuple(s for s in (lower, lower + divisor) if s > 0)


def check_input_size(height: int | None, width: int | None, divisor: int, what: str = "input"):
    """Raise ConfigError unless height and width (None = dynamic, skipped) divide by divisor.

    The message names the nearest sizes that would work, e.g.
    ``input height 100 is not divisible by 2**4=16; use 96 or 112``.
    """
    divisor = int(divisor)
    problems = []
    for label, n in (("height", height), ("width", width)):
        if n is None:
            continue
        n = int(n)
        if n < 1:
            problems.append(f"{label} {n} must be positive")
        elif n % divisor:
            sizes = " or ".join(str(s) for s in nearest_valid_sizes(n, divisor))
            problems.append(
                f"{label} {n} is not divisible by {_divisor_text(divisor)}; use {sizes}"
            )
    if problems:
        raise ConfigError(
            f"{what} " + "; ".join(problems) + " (crop, resize, pad or tile to a multiple)"
        )


def conv_bn_relu(x, filters: int, kernel_size: int = 3, *, batch_norm: bool = True,
                 name: str, act_name: str | None = None):
    """Conv ('same') -> optional BatchNorm -> ReLU; the conv has no bias when BN follows."""
    x = layers.Conv2D(
        filters, kernel_size, padding="same", use_bias=not batch_norm,
        kernel_initializer="he_normal", name=f"{name}_conv",
    )(x)
    if batch_norm:
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=act_name or f"{name}_relu")(x)


def conv_block(x, filters: int, *, n_convs: int = 2, batch_norm: bool = True, name: str):
    """``n_convs`` conv-BN-ReLU units (the U-Net double convolution); output ``{name}_out``."""
    for i in range(1, n_convs + 1):
        last = i == n_convs
        x = conv_bn_relu(x, filters, batch_norm=batch_norm, name=f"{name}_{i}",
                         act_name=f"{name}_out" if last else None)
    return x


def residual_block(x, filters: int, *, batch_norm: bool = True, name: str):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut; output ``{name}_out``.

    The projection is used only when the channel count changes, so the block is a drop-in
    replacement for ``conv_block``.
    """
    shortcut = x
    if x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, padding="same", use_bias=not batch_norm,
                                 kernel_initializer="he_normal", name=f"{name}_proj_conv")(x)
        if batch_norm:
            shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = conv_bn_relu(x, filters, batch_norm=batch_norm, name=f"{name}_1")
    y = layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm,
                      kernel_initializer="he_normal", name=f"{name}_2_conv")(y)
    if batch_norm:
        y = layers.BatchNormalization(name=f"{name}_2_bn")(y)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.Activation("relu", name=f"{name}_out")(y)


def upsample_block(x, filters: int, *, mode: str = "transpose", name: str):
    """Double the spatial size and map to ``filters`` channels; output ``{name}_out``.

    ``"transpose"``: the paper's 2x2 up-convolution (Conv2DTranspose, stride 2).
    ``"bilinear"``: bilinear upsampling (``BilinearUpsample``) then a 1x1 convolution (no
    checkerboard artefacts).
    """
    if mode == "transpose":
        return layers.Conv2DTranspose(filters, 2, strides=2, padding="same",
                                      kernel_initializer="he_normal", name=f"{name}_out")(x)
    if mode == "bilinear":
        x = BilinearUpsample(2, name=f"{name}_bilinear")(x)
        return layers.Conv2D(filters, 1, padding="same", kernel_initializer="he_normal",
                             name=f"{name}_out")(x)
    raise ConfigError(f"upsampling must be 'transpose' or 'bilinear', got {mode!r}")


def _bilinear_1d(k: int) -> np.ndarray:
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    return (1 - np.abs(np.arange(k) - center) / factor).astype(np.float32)


def bilinear_kernel(k: int | Sequence[int], channels: int) -> np.ndarray:
    """Conv2DTranspose kernel (kh, kw, channels, channels) that upsamples bilinearly.

    Each channel is upsampled on its own (the kernel is diagonal in channels). With kernel
    size 2*s, stride s and 'same' padding this is bilinear interpolation by s; for k=4 the 1-D
    profile is (0.25, 0.75, 0.75, 0.25).
    """
    kh, kw = (k, k) if isinstance(k, int) else tuple(k)
    kernel2d = np.outer(_bilinear_1d(int(kh)), _bilinear_1d(int(kw)))
    out = np.zeros((kh, kw, channels, channels), dtype=np.float32)
    for c in range(channels):
        out[:, :, c, c] = kernel2d
    return out


@keras.saving.register_keras_serializable(package="kseg")
class BilinearUpsampleInitializer(keras.initializers.Initializer):
    """Initialise a Conv2DTranspose kernel to per-channel bilinear upsampling (FCN, Long et al.).

    Needs as many filters as input channels; use kernel size 2*stride and padding='same'.
    """

    def __call__(self, shape, dtype=None):
        if len(shape) != 4 or shape[2] != shape[3]:
            raise ValueError(
                "BilinearUpsampleInitializer needs a Conv2DTranspose kernel with filters equal "
                f"to input channels, shape (kh, kw, c, c); got {tuple(shape)}"
            )
        kernel = bilinear_kernel((shape[0], shape[1]), shape[2])
        return keras.ops.convert_to_tensor(kernel, dtype=dtype or keras.backend.floatx())

    def get_config(self):
        return {}


def _upsample_axis(x, factor: int, axis: int):
    """Linear upsampling by an integer ``factor`` along ``axis`` (1 or 2), half-pixel centres and
    clamped edges, as ``tf.image.resize`` / OpenCV's INTER_LINEAR: output pixel ``f*i + r`` lies at
    ``i + d`` source pixels with ``d = (r + 0.5) / f - 0.5``, between pixel i and its neighbour."""
    ops = keras.ops

    def take(part: slice):
        return x[:, part] if axis == 1 else x[:, :, part]

    previous = ops.concatenate([take(slice(0, 1)), take(slice(0, -1))], axis=axis)
    following = ops.concatenate([take(slice(1, None)), take(slice(-1, None))], axis=axis)
    phases = []
    for r in range(factor):
        d = (r + 0.5) / factor - 0.5
        phases.append(-d * previous + (1 + d) * x if d < 0 else (1 - d) * x + d * following)
    stacked = ops.stack(phases, axis=axis + 1)  # (..., length, factor, ...)
    shape = ops.shape(x)
    new_shape = [shape[0], shape[1], shape[2], shape[3]]
    new_shape[axis] = shape[axis] * factor
    return ops.reshape(stacked, new_shape)


@keras.saving.register_keras_serializable(package="kseg")
class BilinearUpsample(layers.Layer):
    """Bilinear upsampling by an integer factor that also works on maps of unknown size.

    Keras 3.15's ``UpSampling2D(interpolation="bilinear")`` hands a symbolic size to
    ``ops.image.resize``, whose ``size[0] <= 0`` check fails inside a TensorFlow graph when the
    height is unknown (kseg trains on (None, None) inputs). This computes the same values
    (``tf.image.resize`` bilinear: half-pixel centres, clamped edges) from shifted copies, in
    ``keras.ops`` only.
    """

    def __init__(self, factor: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.factor = int(factor)
        if self.factor < 1:
            raise ConfigError(f"upsampling factor must be >= 1, got {factor}")

    def call(self, x):
        if self.factor == 1:
            return x
        return _upsample_axis(_upsample_axis(x, self.factor, 1), self.factor, 2)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        return (b, None if h is None else h * self.factor, None if w is None else w * self.factor, c)

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


INPUT_NORMS = (None, "image")


@keras.saving.register_keras_serializable(package="kseg")
class ImageStandardization(layers.Layer):
    """Each image (or crop) to zero mean and unit variance per channel, inside the model.

    Microscopy images differ by orders of magnitude in exposure (dim fluorescence next to
    bright-field); standardising each one lets the convolutions see shapes rather than exposure,
    and being a layer it travels with every saved inference model. ``min_std`` keeps a flat
    background crop from having its noise blown up.
    """

    def __init__(self, min_std: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        self.min_std = float(min_std)

    def call(self, images):
        images = keras.ops.cast(images, self.compute_dtype)
        mean = keras.ops.mean(images, axis=(1, 2), keepdims=True)
        variance = keras.ops.mean(keras.ops.square(images - mean), axis=(1, 2), keepdims=True)
        return (images - mean) / keras.ops.maximum(keras.ops.sqrt(variance), self.min_std)

    def get_config(self):
        return {**super().get_config(), "min_std": self.min_std}


def input_normalization(inputs, method: str | None):
    """Apply the ``input_norm`` option of a builder: None (as given) or ``"image"`` (standardise)."""
    if method not in INPUT_NORMS:
        raise ConfigError(f"input_norm must be one of {INPUT_NORMS}, got {method!r}")
    return inputs if method is None else ImageStandardization(name="input_norm")(inputs)
