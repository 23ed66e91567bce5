"""Model builders by name, where notebooks and older code import them: ``kseg.models.build_model``,
``kseg.models.load_model`` and the builders. The code lives in :mod:`kseg.nn` (registry, encoders,
blocks) and in each family's folder under :mod:`kseg.tasks`.

Every semantic builder returns the Functional *inference* model: one input ``"image"``
(B, H, W, C) and one output (B, H, W, n_out), ``"probs"`` (sigmoid/softmax, float32) or
``"logits"`` when ``activation=None``; the float32 ``"logits"`` layer is always present.
"""

from kseg.nn.backbones import ENCODERS, build_encoder, encoder_preprocess, list_encoders, vgg_backbone
from kseg.nn.blocks import (
    BilinearUpsampleInitializer,
    bilinear_kernel,
    check_input_size,
    nearest_valid_sizes,
)
from kseg.nn.registry import (
    build_model,
    get_model_entry,
    input_divisor,
    list_models,
    register_model,
)
from kseg.tasks.base import load_model
from kseg.tasks.semantic.deeplab import deeplabv3plus
from kseg.tasks.semantic.fcn import fcn, fcn8s, fcn16s, fcn32s
from kseg.tasks.semantic.fpn_decoder import fpn
from kseg.tasks.semantic.heads import TARGET_NAMES, output_channels
from kseg.tasks.semantic.targets import target_channels
from kseg.tasks.semantic.linknet import linknet
from kseg.tasks.semantic.unet import unet
from kseg.tasks.semantic.unetpp import unetpp

__all__ = [
    "ENCODERS",
    "TARGET_NAMES",
    "BilinearUpsampleInitializer",
    "bilinear_kernel",
    "build_encoder",
    "build_model",
    "check_input_size",
    "deeplabv3plus",
    "encoder_preprocess",
    "fcn",
    "fcn8s",
    "fcn16s",
    "fcn32s",
    "fpn",
    "get_model_entry",
    "input_divisor",
    "linknet",
    "list_encoders",
    "list_models",
    "load_model",
    "nearest_valid_sizes",
    "output_channels",
    "register_model",
    "target_channels",
    "unet",
    "unetpp",
    "vgg_backbone",
]
