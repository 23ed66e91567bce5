"""Encoders from keras-hub backbone presets on local disk: ``encoder: "keras_hub:/path/to/preset"``.

A preset folder is what ``backbone.save_to_preset(folder)`` writes (``config.json``,
``model.weights.h5``) or a keras-hub model from Kaggle Models attached to a notebook (the same,
plus the preprocessor's ``image_converter.json``). kseg never downloads: a preset name
(``keras_hub:resnet_50_imagenet``) or a ``kaggle://`` / ``hf://`` handle is refused with a
``ConfigError`` before keras-hub is even imported. keras-hub is an optional dependency
(``pip install kseg[hub]``), imported only when such an encoder is built.

The encoder model ``"encoder"`` (the same contract as ``kseg.nn.backbones.build_encoder``):
image in [0, 1] -> ``input_scaling`` -> the backbone's feature pyramid (a Functional model named
after the backbone that shares its layers, so its weights are the preset's) -> the features at
strides 2, 4, ..., 2**depth that exist.

* Input scaling: keras-hub image converters take 0..255 pixels and compute
  ``x * scale + offset`` (per channel or global), also resizing, which kseg leaves to its own
  preprocessing. ``input_scaling`` applies ``255 x * scale + offset`` from the preset's converter;
  a Keras-format preset without ``image_converter.json`` (a bare ``backbone.save_to_preset``) gets
  255 x, the raw pixels keras-hub assumes when there is no converter. Save the converter of the
  weights beside it (``keras_hub.layers.ImageConverter(scale=..., offset=...).save_to_preset``).
* Strides are measured on a symbolic probe, not read from the pyramid keys: keras-hub calls its
  levels ``P{k}`` but MiT's ``P1`` sits at stride 4 and CSPDarkNet's ``P2`` at stride 2.
* Stride 2: when no pyramid level sits there, the stem is tapped: the last backbone layer (in
  the backbone's layer order) whose output has exactly half the input's height and width.

What each family gives (keras-hub 0.32; the rows marked * are covered by kseg's tests):

=============================  ==============================================================
ResNet (V1) *                  P2..P5 at strides 4..32; stride 2 from the stem's last ReLU
                               (``conv1_relu``, ``conv3_relu`` for the 3-conv "vd" stem)
ResNetV2 *                     the same, stride 2 from the stem's last conv (no activation there)
EfficientNet (V1, V2) *        P1..P5 at strides 2..32
DenseNet *                     P2..P5 at strides 4..32; stride 2 from ``conv1_relu``
MiT (SegFormer) *              strides 4..32 only (a stride-4 patch embedding): no stride-2
                               skip; needs a fixed input size (``input_shape`` without None)
CSPNet *                       its stages; a stride-2 stem conv is tapped when the stages start
                               at stride 4 (CSPResNet, CSPResNeXt); CSPDarkNet's stages already
                               include stride 2
=============================  ==============================================================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np

from kseg.core.errors import ConfigError
from kseg.nn.input_scaling import as_scale, image_scaling

HUB_PREFIX = "keras_hub:"
HUB_DEFAULT_DEPTH = 5
"""Depth when none is given: the usual deepest level of a keras-hub image backbone (stride 32)."""
_PROBE_SIDE = 256
"""Side of the symbolic probe image when the input size is not fixed (a multiple of 2**depth)."""


def is_hub_encoder(name: object) -> bool:
    return isinstance(name, str) and name.startswith(HUB_PREFIX)


def _download_advice() -> str:
    return (
        f"download the preset first and give its folder, e.g. encoder: {HUB_PREFIX}/kaggle/input/"
        "<model>/keras/<variation>/<version> (in a Kaggle notebook: Add Input > Models > the "
        "keras-hub model; or anywhere: backbone.save_to_preset(folder))"
    )


def hub_preset_folder(name: str) -> Path:
    """The local preset folder of ``"keras_hub:<folder>"``; ConfigError for anything remote."""
    preset = name[len(HUB_PREFIX):].strip()
    if not preset:
        raise ConfigError(f"encoder {name!r} names no preset folder; {_download_advice()}")
    if "://" in preset:
        raise ConfigError(f"encoder {name!r}: {preset!r} is a remote handle and kseg never "
                          f"downloads; {_download_advice()}")
    folder = Path(preset).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"encoder {name!r}: {folder} is not a folder on this machine (kseg loads "
                          f"keras-hub presets from local disk only, never by name); "
                          f"{_download_advice()}")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"encoder {name!r}: {folder} has no config.json, so it is not a keras-hub "
                          "preset folder (backbone.save_to_preset writes config.json and "
                          "model.weights.h5)")
    return folder


def import_keras_hub(name: str = f"{HUB_PREFIX}<folder>"):
    """keras-hub, or a ConfigError saying how to install it (it is an optional dependency)."""
    try:
        import keras_hub
    except ImportError as exc:
        raise ConfigError(f"encoder {name!r} needs keras-hub: pip install 'kseg[hub]' "
                          f"(or pip install 'keras-hub>=0.32,<0.33'); import failed: {exc}") from exc
    return keras_hub


def _backbone_overrides(config: dict, input_shape: Sequence[int | None]) -> dict[str, Any]:
    """Rebuild the backbone for kseg's input size (weights do not depend on it) and dtype."""
    overrides: dict[str, Any] = {"dtype": keras.config.dtype_policy().name}
    inner = config.get("config", {}) if "registered_name" in config else {}
    for key in ("image_shape", "input_shape"):
        if key in inner:
            overrides[key] = tuple(input_shape)
    return overrides


def converter_scaling(converter) -> dict[str, Any]:
    """ImageScaling options equal to ``converter(255 * x)`` without its resizing."""
    scale = 1.0 if converter is None or converter.scale is None else converter.scale
    offset = 0.0 if converter is None or converter.offset is None else converter.offset
    return {"scale": as_scale(255.0 * np.asarray(scale, dtype=np.float64)),
            "offset": as_scale(offset)}


def _image_converter(keras_hub, folder: Path, config: dict):
    if "registered_name" in config and not (folder / "image_converter.json").is_file():
        return None
    converter = keras_hub.layers.ImageConverter.from_preset(str(folder))
    base = keras_hub.layers.ImageConverter
    if any(getattr(type(converter), m) is not getattr(base, m) for m in ("call", "_call_python")):
        raise ConfigError(f"the image converter of {folder} ({type(converter).__name__}) does "
                          "more than scale and offset; kseg cannot apply it inside the encoder")
    return converter


def _strides(backbone, tensors: list, input_shape: Sequence[int | None]) -> list[int | None]:
    """The stride of each tensor of the backbone (None: not a stride), from the static shapes
    when the backbone was built for a fixed size, else from a symbolic probe."""
    side = backbone.inputs[0].shape[1]
    shapes = [tuple(t.shape) for t in tensors]
    if side is None or any(len(s) == 4 and s[1] is None for s in shapes):
        side = input_shape[0] if input_shape[0] is not None else _PROBE_SIDE
        probe_shape = (1, side, input_shape[1] if input_shape[1] is not None else side,
                       input_shape[2])
        probe = keras.Model(backbone.inputs, tensors)
        shapes = [tuple(spec.shape) for spec in probe.compute_output_spec(keras.KerasTensor(probe_shape))]
    strides = []
    for shape in shapes:
        rows = shape[1] if len(shape) == 4 else None
        stride = side // rows if rows and side % rows == 0 else None
        strides.append(stride if stride and stride & (stride - 1) == 0 else None)
    return strides


def _stem_tap(backbone, input_shape):
    """The output of the last backbone layer at exactly stride 2, or None."""
    candidates = []
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        try:
            output = layer.output
        except (ValueError, AttributeError):  # a layer called more than once has no one output
            continue
        if isinstance(output, keras.KerasTensor) and len(output.shape) == 4:
            candidates.append(output)
    if not candidates:
        return None
    at_two = [t for t, s in zip(candidates, _strides(backbone, candidates, input_shape)) if s == 2]
    return at_two[-1] if at_two else None


def build_hub_encoder(name: str, input_shape: Sequence[int | None], *,
                      depth: int = HUB_DEFAULT_DEPTH,
                      scale_inputs: bool = True) -> tuple[keras.Model, list[int]]:
    """``(encoder, strides)`` from the keras-hub preset folder of ``name`` (see module notes)."""
    folder = hub_preset_folder(name)
    if len(input_shape) != 3:
        raise ConfigError(f"input_shape must be (height, width, channels), got {input_shape}")
    keras_hub = import_keras_hub(name)
    config = json.loads((folder / "config.json").read_text())
    try:
        backbone = keras_hub.models.Backbone.from_preset(
            str(folder), **_backbone_overrides(config, input_shape))
        converter = _image_converter(keras_hub, folder, config)
    except ConfigError:
        raise
    except Exception as exc:  # keras-hub raises ValueError, TypeError, KeyError, ... for bad presets
        raise ConfigError(f"encoder {name!r}: keras-hub could not load the preset in {folder} for "
                          f"input shape {tuple(input_shape)} (families such as MiT need a fixed "
                          f"height and width): {type(exc).__name__}: {exc}") from exc

    pyramid = list(getattr(backbone, "pyramid_outputs", {}).values())
    if not pyramid:
        raise ConfigError(f"encoder {name!r}: {type(backbone).__name__} has no pyramid_outputs "
                          "(feature maps by stride); use an image backbone such as ResNet, "
                          "EfficientNet, DenseNet, MiT or CSPNet")
    by_stride = {s: t for t, s in zip(pyramid, _strides(backbone, pyramid, input_shape)) if s}
    if 2 not in by_stride:
        stem = _stem_tap(backbone, input_shape)
        if stem is not None:
            by_stride[2] = stem
    available = sorted(by_stride)
    if 2**depth not in by_stride:
        depths = [s.bit_length() - 1 for s in available if s >= 2]
        raise ConfigError(f"encoder {name!r}: {type(backbone).__name__} gives features at strides "
                          f"{available}, so depth must be one of {depths}; got {depth}")
    strides = [s for s in available if 2 <= s <= 2**depth]
    features = keras.Model(backbone.inputs[0], [by_stride[s] for s in strides], name=backbone.name)

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    if scale_inputs:
        x = image_scaling(inputs, converter_scaling(converter), channels=input_shape[-1],
                          what=f"the image converter of {folder}")
    outputs = features(x)
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    if any(t.shape[-1] is None for t in outputs):
        outputs = _with_known_channels(features, outputs, input_shape, name)
    return keras.Model(inputs, outputs, name="encoder"), strides


def _with_known_channels(features: keras.Model, outputs: list, input_shape: Sequence[int | None],
                         name: str) -> list:
    """keras-hub's MiT leaves the channels of a 1 x 1 feature map unknown (32 px input, stride 32);
    a decoder's convolutions need them. With the fixed input size such a backbone needs, one
    forward pass of zeros measures them and a Reshape states them."""
    if None in tuple(input_shape[:2]):
        raise ConfigError(f"encoder {name!r}: a feature map of unknown channels needs a fixed input "
                          f"height and width, got input shape {tuple(input_shape)}")
    measured = features(np.zeros((1, *input_shape), np.float32))
    measured = measured if isinstance(measured, (list, tuple)) else [measured]
    return [t if t.shape[-1] is not None else
            keras.layers.Reshape(tuple(m.shape[1:]), name=f"known_channels_{k}")(t)
            for k, (t, m) in enumerate(zip(outputs, measured))]
