"""Pixel scaling inside the model: kseg's 0..1 images to the input an encoder's weights expect.

kseg feeds every model float32 images in [0, 1] (uint8 / 255, in the generator, the validation
code and the predictor alike). Pretrained encoders were trained on other ranges, so each encoder
model starts with an ``ImageScaling`` layer that maps [0, 1] to its own convention. Being a layer,
it is saved with the model: training, validation and submission cannot disagree, and a ``.keras``
file needs no preprocessing code beside it.

Conventions (``SCALINGS``; ``x`` is the [0, 1] input, ``c`` the channel):

=========  ==========================================================  ==============================
name       the encoder sees                                            as keras.applications'
=========  ==========================================================  ==============================
caffe      RGB -> BGR, 255 x - ImageNet mean (103.939, 116.779,        resnet50 / vgg16
           123.68 in BGR order), no division                           ``preprocess_input`` ("caffe")
tf         2 x - 1 (range -1..1)                                       resnet_v2 ("tf")
torch      (x - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)         densenet ("torch")
raw255     255 x (the network rescales and normalises inside itself)   efficientnet, efficientnet_v2,
                                                                       convnext (identity)
=========  ==========================================================  ==============================
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
from keras import layers

from kseg.core.errors import ConfigError

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def as_scale(value) -> float | tuple[float, ...]:
    """A number, or one number per channel, as plain floats (what the layer config stores)."""
    if np.ndim(value) == 0:
        return float(value)
    return tuple(float(v) for v in np.ravel(value))


@keras.saving.register_keras_serializable(package="kseg")
class ImageScaling(layers.Layer):
    """``x * scale + offset`` per channel, after an optional RGB -> BGR flip; no weights.

    ``scale`` and ``offset`` are numbers or one number per channel. The layer computes in float32
    by default (a caffe mean subtraction in float16 would round to 1/8 of a grey level).
    """

    def __init__(self, scale=1.0, offset=0.0, reverse_channels: bool = False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.scale = as_scale(scale)
        self.offset = as_scale(offset)
        self.reverse_channels = bool(reverse_channels)

    def call(self, images):
        x = keras.ops.cast(images, self.compute_dtype)
        if self.reverse_channels:
            x = keras.ops.flip(x, axis=-1)
        scale = np.asarray(self.scale, dtype=self.compute_dtype)
        offset = np.asarray(self.offset, dtype=self.compute_dtype)
        return x * scale + offset

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "offset": self.offset,
                "reverse_channels": self.reverse_channels}


def _per_channel(mean: Sequence[float], std: Sequence[float]) -> dict:
    return {"scale": tuple(1.0 / s for s in std), "offset": tuple(-m / s for m, s in zip(mean, std))}


SCALINGS: dict[str, dict] = {
    "caffe": {"scale": 255.0, "offset": tuple(-m for m in CAFFE_MEAN_BGR), "reverse_channels": True},
    "tf": {"scale": 2.0, "offset": -1.0},
    "torch": _per_channel(IMAGENET_MEAN_RGB, IMAGENET_STD_RGB),
    "raw255": {"scale": 255.0, "offset": 0.0},
}
"""ImageScaling options of each named convention, for inputs in [0, 1]."""


def check_channels(options: dict, channels: int | None, what: str) -> None:
    """Per-channel statistics (or a BGR flip) need exactly as many input channels as they list."""
    sizes = {len(v) for v in (options.get("scale"), options.get("offset")) if isinstance(v, tuple)}
    if options.get("reverse_channels"):
        sizes.add(3)
    for size in sizes:
        if channels is not None and int(channels) != size:
            raise ConfigError(
                f"{what} normalises {size} colour channels (its weights' statistics per channel) "
                f"but the input has {channels}; feed RGB images (preprocess.channels: {size}) or "
                "use the plain U-Net (no encoder)"
            )


def image_scaling(inputs, scaling: str | dict, *, channels: int | None = None,
                  what: str = "the encoder", name: str = "input_scaling"):
    """Apply a named convention of ``SCALINGS`` (or explicit ImageScaling options) to ``inputs``."""
    if isinstance(scaling, str):
        try:
            options = SCALINGS[scaling]
        except KeyError:
            raise ConfigError(f"unknown input scaling {scaling!r}; available: "
                              f"{', '.join(sorted(SCALINGS))}") from None
    else:
        options = dict(scaling)
    check_channels(options, channels, what)
    return ImageScaling(**options, name=name)(inputs)
