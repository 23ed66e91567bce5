"""SSD: Single Shot MultiBox Detector (Liu et al., ECCV 2016) as Keras Functional models.

``ssd(...)`` maps an image (B, H, W, C) to ONE tensor (B, N, 4 + n_classes): for every default
box the 4 SSD offsets (see ``kseg.nn.box_ops.encode_boxes``) followed by the class logits
(class 0 = background). The N default boxes come from ``ssd_default_boxes_for(input_size,
backbone, ...)`` (NumPy, same order as the model's rows); ``ssd_feature_shapes`` lists the maps.

Backbones:

* ``"vgg16"`` -- SSD300 / SSD512 of the paper. VGG16 conv blocks with layer names as
  ``keras.applications.VGG16`` (``block{i}_conv{j}``, so ``copy_vgg16_weights`` works), but the
  2x2 pools of blocks 1-4 use 'same' padding (Caffe's ceil mode: 75 -> 38 at 300 input;
  ``backbones.vgg_backbone(pool_padding="same")``).
  conv4_3 (stride 8) goes through ``L2Normalization`` (learnable per-channel scale, init 20);
  pool5 is 3x3 stride 1, fc6 a 3x3 conv with dilation 6 (1024), fc7 1x1 (1024); then the
  extra layers (1x1 bottleneck -> 3x3 conv). Feature maps by input size:

  ===========  ===========================================  ========  =======
  input        maps (rows = cols)                           extras    N
  ===========  ===========================================  ========  =======
  300          38, 19, 10, 5, 3, 1 (SSD300: two 3x3 s2       4         8732
               'same', then two 3x3 'valid')
  512          64, 32, 16, 8, 4, 2, 1 (SSD512 layout)         5         24564
  16k, k >= 2  H/8, H/16, then ceil(n/2) by 3x3 stride-2      until 1x1
               'same' convs until the map is 1x1 (e.g. 256:
               32, 16, 8, 4, 2, 1)
  ===========  ===========================================  ========  =======

  Height and width are handled separately (non-square multiples of 16 work). Extra layer
  widths: bottleneck 256 then 128, outputs 512 then 256 (as the paper). SSD512's last extra
  layer is a 4x4 conv in the Caffe model; here it is the generic 3x3 stride-2 'same' conv
  (same 2 -> 1 map). Default aspect ratios: (1, 2, 1/2) on the first and the last two maps,
  (1, 2, 1/2, 3, 1/3) on the others (the paper's SSD300/SSD512 sets), each plus the extra 1:1
  box; scales ``linspace(min_scale, max_scale)`` over the maps (``box_ops.ssd_scales``).
* ``"small"`` -- a tiny CPU/test network: six plain 3x3 convs (width w: w, 2w s2, 2w s2, 4w s2,
  4w s2, 4w s2; default w=8, ~50k parameters with the heads) giving three maps at strides 8,
  16, 32 (8, 4, 2 for 64 input); input sides must be multiples of 32. Aspect ratios (1, 2, 1/2).

Heads: per map a 3x3 conv for offsets (k*4) and one for logits (k*n_classes), k =
``boxes_per_position``; both are reshaped to (B, rows*cols*k, .) -- row-major positions, then
per-position boxes -- and concatenated map by map, exactly the ``box_ops.default_boxes`` order.

Inference: ``ssd_inference_model(model, default_boxes)`` wraps the model with a
``DetectionDecoder`` (decode, clip to [0, 1], softmax, class-wise NMS) giving fixed-shape
``{"boxes", "scores", "classes", "valid"}``. Training: ``ssd_training_model(model, boxes)`` takes
``{"image", "target_offsets", "target_labels"}`` (targets from ``kseg.tasks.ssd.losses.ssd_targets``) and adds
``multibox_loss`` (``loss="mining"``) or ``multibox_focal_loss`` (``loss="focal"``) with
``add_loss``, so ``compile(optimizer=...)`` then ``fit(x_dict)`` without ``y`` trains it.

Registered as ``ssd`` with ``task="detection"``: ``make train MODEL=ssd`` trains it through
:mod:`kseg.engine.fit` through :mod:`kseg.tasks.ssd.task` (input size from the config's ``detection.input_size``).

Model math uses ``keras.ops`` only (TensorFlow and JAX backends).
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import numpy as np
from keras import layers, ops

from kseg.core.errors import ConfigError
from kseg.nn import box_ops
from kseg.nn.backbones import vgg_backbone
from kseg.nn.blocks import input_normalization, nearest_valid_sizes
from kseg.nn.registry import register_model
from kseg.tasks.ssd import losses as kseg_losses

__all__ = [
    "BACKBONES",
    "DetectionDecoder",
    "L2Normalization",
    "MultiboxLossLayer",
    "ssd",
    "ssd_aspect_ratios",
    "ssd_default_boxes_for",
    "ssd_feature_shapes",
    "ssd_inference_model",
    "ssd_training_model",
]

BACKBONES = ("vgg16", "small")
DEFAULT_WIDTH = {"vgg16": 64, "small": 8}
VGG_DIVISOR = 16
SMALL_DIVISOR = 32
_WIDE_RATIOS = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0)


# ----------------------------------------------------------------------------- geometry


def _image_size(input_size) -> tuple[int, int]:
    """``300``, ``(300, 300)`` or ``(300, 300, 3)`` -> (height, width); None sizes are refused."""
    if isinstance(input_size, (int, np.integer)):
        size = (int(input_size), int(input_size))
    else:
        size = tuple(input_size)[:2]
        if len(size) == 1:
            size = (size[0], size[0])
    if any(s is None for s in size):
        raise ConfigError(f"SSD needs a fixed input height and width (default boxes depend on them), "
                          f"got {input_size}")
    return int(size[0]), int(size[1])


def _size_error(backbone: str, size: tuple[int, int]) -> ConfigError:
    if backbone == "vgg16":
        divisor, extra = VGG_DIVISOR, "300 (SSD300), 512 (SSD512) or "
        minimum = 2 * VGG_DIVISOR
    else:
        divisor, extra, minimum = SMALL_DIVISOR, "", SMALL_DIVISOR
    hints = []
    for label, n in zip(("height", "width"), size):
        if n < minimum:
            hints.append(f"{label} {n} is below {minimum}")
        elif n % divisor:
            options = " or ".join(str(s) for s in nearest_valid_sizes(n, divisor))
            hints.append(f"{label} {n}: use {options}")
    return ConfigError(
        f"SSD backbone {backbone!r} does not support input size {size[0]}x{size[1]}; it takes "
        f"{extra}any height and width that are multiples of {divisor} (at least {minimum})"
        + (f" ({'; '.join(hints)})" if hints else "")
    )


def _check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise ConfigError(f"unknown SSD backbone {backbone!r}; available: {', '.join(BACKBONES)}")


def _is_ssd300(size: tuple[int, int]) -> bool:
    return size == (300, 300)


def ssd_feature_shapes(input_size, backbone: str = "vgg16") -> list[tuple[int, int]]:
    """(rows, cols) of every SSD feature map, in head order, for an input size (see module notes).

    Raises ``ConfigError`` naming the sizes that work when the size is unsupported.
    """
    _check_backbone(backbone)
    size = _image_size(input_size)
    h, w = size
    if backbone == "small":
        if min(size) < SMALL_DIVISOR or h % SMALL_DIVISOR or w % SMALL_DIVISOR:
            raise _size_error(backbone, size)
        return [(h // s, w // s) for s in (8, 16, 32)]
    if _is_ssd300(size):
        return [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    if min(size) < 2 * VGG_DIVISOR or h % VGG_DIVISOR or w % VGG_DIVISOR:
        raise _size_error(backbone, size)
    shapes = [(h // 8, w // 8), (h // 16, w // 16)]
    while max(shapes[-1]) > 1:
        rows, cols = shapes[-1]
        shapes.append((math.ceil(rows / 2), math.ceil(cols / 2)))
    return shapes


def ssd_aspect_ratios(n_maps: int, backbone: str = "vgg16") -> list[tuple[float, ...]]:
    """Default per-map aspect ratios: the paper's pattern for vgg16, (1, 2, 1/2) for small."""
    _check_backbone(backbone)
    if backbone == "small" or n_maps < 4:
        return [tuple(box_ops.DEFAULT_ASPECT_RATIOS)] * n_maps
    narrow = tuple(box_ops.DEFAULT_ASPECT_RATIOS)
    return [narrow] + [_WIDE_RATIOS] * (n_maps - 3) + [narrow, narrow]


def _resolve_aspect_ratios(aspect_ratios, n_maps: int, backbone: str) -> list[tuple[float, ...]]:
    if aspect_ratios is None:
        return ssd_aspect_ratios(n_maps, backbone)
    ratios = list(aspect_ratios)
    if not ratios:
        raise ConfigError("aspect_ratios must not be empty")
    if not isinstance(ratios[0], (list, tuple, np.ndarray)):
        ratios = [tuple(ratios)] * n_maps
    if len(ratios) != n_maps:
        raise ConfigError(f"aspect_ratios lists {len(ratios)} maps but this input size gives {n_maps}")
    out = [tuple(float(r) for r in per_map) for per_map in ratios]
    if any(r <= 0 for per_map in out for r in per_map):
        raise ConfigError(f"aspect ratios must be positive, got {out}")
    return out


def ssd_default_boxes_for(input_size, backbone: str = "vgg16", *, aspect_ratios=None,
                          min_scale: float = 0.2, max_scale: float = 0.9) -> np.ndarray:
    """The (N, 4) float32 default boxes matching ``ssd(input_size, backbone=...)`` row for row.

    Pass the same ``aspect_ratios`` / ``min_scale`` / ``max_scale`` as to ``ssd``.
    """
    size = _image_size(input_size)
    shapes = ssd_feature_shapes(size, backbone)
    ratios = _resolve_aspect_ratios(aspect_ratios, len(shapes), backbone)
    return box_ops.default_boxes(shapes, size, aspect_ratios=ratios, min_scale=min_scale,
                                 max_scale=max_scale)


# ----------------------------------------------------------------------------- layers


@keras.saving.register_keras_serializable(package="kseg")
class L2Normalization(layers.Layer):
    """L2-normalise over channels, then scale by a learnable per-channel factor (init ``scale``)."""

    def __init__(self, scale: float = 20.0, epsilon: float = 1e-10, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        self.gamma = self.add_weight(name="gamma", shape=(int(input_shape[-1]),),
                                     initializer=keras.initializers.Constant(self.scale))

    def call(self, x):
        norm = ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True) + self.epsilon)
        return x / norm * ops.cast(self.gamma, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="kseg")
class DetectionDecoder(layers.Layer):
    """SSD output (B, N, 4 + C) -> fixed-shape detections after class-wise NMS.

    Decodes the offsets against ``default_boxes`` (``box_ops.decode_boxes`` with ``variances``),
    clips to [0, 1], softmaxes the logits and runs ``box_ops.batched_class_nms``. Returns a dict:
    ``boxes`` (B, max_output, 4), ``scores`` (B, max_output), ``classes`` (B, max_output) int32,
    ``valid`` (B,) int32; detections first, by decreasing score, padding rows zero.
    """

    def __init__(self, default_boxes, variances=box_ops.VARIANCES, max_output: int = 100,
                 iou_threshold: float = 0.45, score_threshold: float = 0.01, pre_nms_top_k: int = 400,
                 **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        boxes = np.asarray(default_boxes, dtype=np.float32)
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ConfigError(f"default_boxes must be (N, 4), got shape {boxes.shape}")
        self.default_boxes = boxes
        self.variances = tuple(float(v) for v in variances)
        self.max_output = int(max_output)
        self.iou_threshold = float(iou_threshold)
        self.score_threshold = float(score_threshold)
        self.pre_nms_top_k = int(pre_nms_top_k)

    def call(self, predictions):
        predictions = ops.cast(predictions, "float32")
        if predictions.shape[-2] is not None and predictions.shape[-2] != self.default_boxes.shape[0]:
            raise ValueError(f"predictions have {predictions.shape[-2]} boxes, the decoder "
                             f"{self.default_boxes.shape[0]} default boxes")
        anchors = ops.convert_to_tensor(self.default_boxes)
        boxes = box_ops.clip_boxes(box_ops.decode_boxes(predictions[..., :4], anchors, self.variances))
        scores = ops.softmax(predictions[..., 4:], axis=-1)
        return box_ops.batched_class_nms(
            boxes, scores, max_output=self.max_output, iou_threshold=self.iou_threshold,
            score_threshold=self.score_threshold, pre_nms_top_k=self.pre_nms_top_k,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "default_boxes": self.default_boxes.tolist(),
            "variances": list(self.variances),
            "max_output": self.max_output,
            "iou_threshold": self.iou_threshold,
            "score_threshold": self.score_threshold,
            "pre_nms_top_k": self.pre_nms_top_k,
        }


@keras.saving.register_keras_serializable(package="kseg")
class MultiboxLossLayer(layers.Layer):
    """Adds the SSD loss of ``prediction`` (B, N, 4 + C) against the targets; returns the prediction.

    ``loss="mining"``: ``kseg.tasks.ssd.losses.multibox_loss`` (hard-negative mining); ``"focal"``:
    ``kseg.tasks.ssd.losses.multibox_focal_loss``. ``loss_kwargs`` go to that function. Computes in float32.
    """

    LOSSES = {"mining": kseg_losses.multibox_loss, "focal": kseg_losses.multibox_focal_loss}

    def __init__(self, loss: str = "mining", loss_kwargs=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if loss not in self.LOSSES:
            raise ConfigError(f"SSD loss must be one of {', '.join(self.LOSSES)}, got {loss!r}")
        self.loss_name = loss
        self.loss_kwargs = dict(loss_kwargs or {})
        self._loss_fn = self.LOSSES[loss]

    def call(self, prediction, target_offsets, target_labels):
        prediction = ops.cast(prediction, "float32")
        self.add_loss(self._loss_fn(target_offsets, target_labels, prediction[..., :4],
                                    prediction[..., 4:], **self.loss_kwargs))
        return prediction

    def compute_output_shape(self, prediction_shape, *args):
        return prediction_shape

    def get_config(self):
        return {**super().get_config(), "loss": self.loss_name, "loss_kwargs": dict(self.loss_kwargs)}


# ----------------------------------------------------------------------------- backbones


def _conv(x, filters, kernel, *, name, strides=1, padding="same", dilation=1):
    return layers.Conv2D(filters, kernel, strides=strides, padding=padding, dilation_rate=dilation,
                         activation="relu", name=name)(x)


def _vgg16_features(x, width: int, size: tuple[int, int]) -> list:
    """SSD's VGG16 (ceil-mode pools, pool5 3x3 s1, dilated fc6, fc7) plus the extra layers."""
    backbone = vgg_backbone(x, width=width, pool_padding="same")  # its 2x2 block5_pool goes unused
    conv4_3 = L2Normalization(20.0, name="conv4_3_norm")(backbone["block4_out"])
    x = backbone["block5_out"]
    x = layers.MaxPooling2D(3, strides=1, padding="same", name="pool5")(x)
    fc_width = 16 * width
    x = _conv(x, fc_width, 3, dilation=6, name="fc6")
    x = _conv(x, fc_width, 1, name="fc7")
    feats = [conv4_3, x]
    n_extra = len(ssd_feature_shapes(size, "vgg16")) - 2
    for i in range(n_extra):
        bottleneck, out = (4 * width, 8 * width) if i == 0 else (2 * width, 4 * width)
        x = _conv(x, bottleneck, 1, name=f"extra{i + 1}_1")
        if _is_ssd300(size) and i >= 2:
            x = _conv(x, out, 3, padding="valid", name=f"extra{i + 1}_2")
        else:
            x = _conv(x, out, 3, strides=2, name=f"extra{i + 1}_2")
        feats.append(x)
    return feats


def _small_features(x, width: int) -> list:
    """Six 3x3 convs; the maps after the 3rd, 4th and 5th stride-2 conv (strides 8, 16, 32)."""
    x = _conv(x, width, 3, name="small_conv1")
    x = _conv(x, 2 * width, 3, strides=2, name="small_conv2")
    x = _conv(x, 2 * width, 3, strides=2, name="small_conv3")
    feats = []
    for i in range(3):
        x = _conv(x, 4 * width, 3, strides=2, name=f"small_conv{4 + i}")
        feats.append(x)
    return feats


# ----------------------------------------------------------------------------- builders


def _ssd_divisor(backbone: str = "vgg16", **_) -> int:
    return SMALL_DIVISOR if backbone == "small" else VGG_DIVISOR


@register_model("ssd", task="detection", divisor=_ssd_divisor)
def ssd(
    input_shape: Sequence[int] = (300, 300, 3),
    n_classes: int = 2,
    *,
    backbone: str = "vgg16",
    width: int | None = None,
    aspect_ratios=None,
    min_scale: float = 0.2,
    max_scale: float = 0.9,
    input_norm: str | None = None,
    name: str = "ssd",
) -> keras.Model:
    """Build the SSD model: image (B, H, W, C) -> (B, N, 4 + n_classes) offsets and logits.

    Args:
        input_shape: (H, W, C) with fixed H and W (see the module notes for the sizes).
        n_classes: classes including background (class 0); at least 2.
        backbone: ``"vgg16"`` (SSD300 / SSD512 layout) or ``"small"`` (tests, CPU).
        width: base channel count (vgg16: 64 = VGG16; small: 8). All layer widths scale with it.
        aspect_ratios: one tuple for every map or a per-map list (default: see module notes).
        min_scale / max_scale: only used by ``ssd_default_boxes_for``; accepted here so one set of
            options builds both (the network does not depend on them).
        input_norm: None or ``"image"`` (per-image standardisation, ``blocks.input_normalization``).
    """
    _check_backbone(backbone)
    if len(input_shape) != 3:
        raise ConfigError(f"input_shape must be (height, width, channels), got {input_shape}")
    if int(n_classes) < 2:
        raise ConfigError(f"n_classes counts the background class 0 and must be >= 2, got {n_classes}")
    if not 0.0 < float(min_scale) <= float(max_scale):
        raise ConfigError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
    n_classes = int(n_classes)
    width = int(width or DEFAULT_WIDTH[backbone])
    if width < 1:
        raise ConfigError(f"width must be >= 1, got {width}")
    size = _image_size(input_shape)
    shapes = ssd_feature_shapes(size, backbone)
    ratios = _resolve_aspect_ratios(aspect_ratios, len(shapes), backbone)
    per_position = box_ops.boxes_per_position(ratios)

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = input_normalization(inputs, input_norm)
    if backbone == "vgg16":
        feats = _vgg16_features(x, width, size)
    else:
        feats = _small_features(x, width)

    offsets, logits = [], []
    for m, (feat, k, shape) in enumerate(zip(feats, per_position, shapes)):
        if tuple(feat.shape[1:3]) != tuple(shape):  # a bug guard: heads and default boxes must agree
            raise AssertionError(f"map {m} has shape {feat.shape[1:3]}, expected {shape}")
        loc = layers.Conv2D(k * 4, 3, padding="same", name=f"head{m + 1}_offsets")(feat)
        conf = layers.Conv2D(k * n_classes, 3, padding="same", name=f"head{m + 1}_logits")(feat)
        offsets.append(layers.Reshape((-1, 4), name=f"head{m + 1}_offsets_flat")(loc))
        logits.append(layers.Reshape((-1, n_classes), name=f"head{m + 1}_logits_flat")(conf))
    offsets = layers.Concatenate(axis=1, name="offsets")(offsets) if len(offsets) > 1 else offsets[0]
    logits = layers.Concatenate(axis=1, name="logits")(logits) if len(logits) > 1 else logits[0]
    outputs = layers.Concatenate(axis=-1, name="predictions")([offsets, logits])
    return keras.Model(inputs, outputs, name=name)


def _single_io(model: keras.Model) -> None:
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"model {model.name!r} must map one image to one (B, N, 4 + C) tensor")


def ssd_inference_model(model: keras.Model, default_boxes, *, max_output: int = 100,
                        iou_threshold: float = 0.45, score_threshold: float = 0.01,
                        pre_nms_top_k: int = 400, variances=box_ops.VARIANCES,
                        name: str | None = None) -> keras.Model:
    """image -> ``{"boxes", "scores", "classes", "valid"}``: ``model`` (nested, weights shared)
    followed by a ``DetectionDecoder``."""
    _single_io(model)
    n_boxes = model.outputs[0].shape[1]
    if n_boxes != len(default_boxes):
        raise ConfigError(f"model {model.name!r} predicts {n_boxes} boxes but {len(default_boxes)} "
                          "default boxes were given (use ssd_default_boxes_for with the same options)")
    spec = model.inputs[0]
    image = keras.Input(shape=tuple(spec.shape[1:]), dtype=spec.dtype, name="image")
    decoder = DetectionDecoder(default_boxes, variances=variances, max_output=max_output,
                               iou_threshold=iou_threshold, score_threshold=score_threshold,
                               pre_nms_top_k=pre_nms_top_k, name="detections")
    return keras.Model(image, decoder(model(image)), name=name or f"{model.name}_inference")


def ssd_training_model(model: keras.Model, default_boxes, loss: str = "mining", **loss_kwargs) -> keras.Model:
    """Functional model on ``{"image", "target_offsets" (N, 4), "target_labels" (N,) int32}``
    whose ``MultiboxLossLayer`` adds the loss; train with ``compile(optimizer=...)`` and
    ``fit(x_dict)`` (no ``y``). ``model`` is nested, so the weights are shared."""
    _single_io(model)
    n_boxes = int(model.outputs[0].shape[1])
    if n_boxes != len(default_boxes):
        raise ConfigError(f"model {model.name!r} predicts {n_boxes} boxes but {len(default_boxes)} "
                          "default boxes were given")
    spec = model.inputs[0]
    image = keras.Input(shape=tuple(spec.shape[1:]), dtype=spec.dtype, name="image")
    target_offsets = keras.Input(shape=(n_boxes, 4), dtype="float32", name="target_offsets")
    target_labels = keras.Input(shape=(n_boxes,), dtype="int32", name="target_labels")
    prediction = MultiboxLossLayer(loss, loss_kwargs, name="multibox_loss")(
        model(image), target_offsets, target_labels)
    return keras.Model(
        inputs={"image": image, "target_offsets": target_offsets, "target_labels": target_labels},
        outputs=prediction, name=f"{model.name}_training",
    )
