"""Segmentation model builders behind a name registry: ``build_model("unet", n_classes=1)``.

Every semantic builder returns the Functional *inference* model: one input ``"image"``
(B, H, W, C) and one output (B, H, W, n_out), ``"probs"`` (sigmoid/softmax, float32) or
``"logits"`` when ``activation=None``; the float32 ``"logits"`` layer is always present.
"""

from kseg.models.backbones import ENCODERS, build_encoder, encoder_preprocess, vgg_backbone
from kseg.models.blocks import (
    TARGET_NAMES,
    BilinearUpsampleInitializer,
    bilinear_kernel,
    check_input_size,
    nearest_valid_sizes,
    output_channels,
    target_channels,
)
from kseg.models.fcn import fcn, fcn8s, fcn16s, fcn32s
from kseg.models.registry import (
    build_model,
    get_model_entry,
    input_divisor,
    list_models,
    register_model,
)
from kseg.models.unet import unet


def load_model(path):
    """Load a saved ``.keras`` model (e.g. a run's ``best.keras``) without compiling it.

    Importing this package registers kseg's custom layers and initializers, which Keras needs
    to rebuild a saved model; always load through here (or import ``kseg.models`` first).
    """
    import keras

    list_models()  # imports every built-in model module, which registers its custom layers
    return keras.saving.load_model(path, compile=False)

__all__ = [
    "ENCODERS",
    "TARGET_NAMES",
    "BilinearUpsampleInitializer",
    "bilinear_kernel",
    "build_encoder",
    "build_model",
    "check_input_size",
    "encoder_preprocess",
    "fcn",
    "fcn8s",
    "fcn16s",
    "fcn32s",
    "get_model_entry",
    "input_divisor",
    "list_models",
    "load_model",
    "nearest_valid_sizes",
    "output_channels",
    "register_model",
    "target_channels",
    "unet",
    "vgg_backbone",
]
