"""Auxiliary outputs of the semantic decoders, used in training only: deep-supervision heads and
the image-level classification head; and the split of a model that has them into the one-output
inference model.

A builder given ``deep_supervision=True`` (``unet``, ``unetpp``, ``linknet``) or
``classification_head=True`` (those and ``fpn``, ``deeplabv3plus``) returns a model with several
outputs, the main head first::

    [probs, aux1_probs, ..., auxN_probs, classification]

``aux{k}`` (k = 1 at the deepest decoder depth): a 1x1 convolution of that depth's output to the
main head's channels (``aux{k}_head``), upsampled bilinearly to full resolution
(``aux{k}_upsample``: a frozen bilinear transposed convolution in float32, because
``UpSampling2D(interpolation="bilinear")`` fails in a TensorFlow graph on maps of unknown size;
upsampling logits rather than features is cheaper),
then the float32 ``aux{k}_logits`` and, with the main head's activation, ``aux{k}_probs``.
``classification``: the probability that the image holds any foreground, from the deepest
encoder feature through global average pooling (``classification_pool``), dropout
(``classification_dropout``) and a float32 dense unit with a sigmoid (``classification_dense``).

Why a multi-output builder and a split rather than a hidden second model: a Functional model
keeps only the layers its outputs reach, so the auxiliary heads exist only in a model that
outputs them. ``main_model`` gives the one-output sibling over the same layers: the inference
model that prediction, TTA, tiling, checkpoints and submissions see; it holds no auxiliary
weights. ``kseg.tasks.semantic.training_graph.build_training_model`` takes the multi-output
model and adds a weighted loss for each extra output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import layers

from kseg.core.errors import ConfigError
from kseg.nn.blocks import BilinearUpsampleInitializer
from kseg.tasks.semantic.decoders import check_dropout

AUXILIARY_PREFIX = "aux"
CLASSIFICATION = "classification"


def check_auxiliary(n_auxiliary: int, *, deep_supervision: bool, classification_dropout: float,
                    decoder: str) -> None:
    """ConfigError when deep supervision has no decoder depth to supervise, or a bad dropout."""
    check_dropout(classification_dropout, "classification_dropout")
    if deep_supervision and n_auxiliary < 1:
        raise ConfigError(f"deep_supervision on {decoder} needs decoder depths below the last one: use "
                          "depth >= 2, or deep_supervision: false")


def deep_supervision_heads(features: Sequence[tuple[int, Any]], n_out: int, activation: str | None) -> list:
    """One auxiliary output per (stride, feature), deepest first: ``aux1``, ``aux2``, ..."""
    outputs = []
    for k, (stride, x) in enumerate(features, start=1):
        x = layers.Conv2D(n_out, 1, padding="same", name=f"{AUXILIARY_PREFIX}{k}_head")(x)
        if stride > 1:
            x = layers.Conv2DTranspose(n_out, 2 * stride, strides=stride, padding="same", use_bias=False,
                                       kernel_initializer=BilinearUpsampleInitializer(), trainable=False,
                                       dtype="float32", name=f"{AUXILIARY_PREFIX}{k}_upsample")(x)
        x = layers.Activation("linear", dtype="float32", name=f"{AUXILIARY_PREFIX}{k}_logits")(x)
        if activation is not None:
            x = layers.Activation(activation, dtype="float32", name=f"{AUXILIARY_PREFIX}{k}_probs")(x)
        outputs.append(x)
    return outputs


def classification_output(feature, dropout: float = 0.2):
    """(B, 1) probability that the image holds any foreground, from the deepest feature."""
    x = layers.GlobalAveragePooling2D(name=f"{CLASSIFICATION}_pool")(feature)
    if dropout:
        x = layers.Dropout(dropout, name=f"{CLASSIFICATION}_dropout")(x)
    x = layers.Dense(1, dtype="float32", name=f"{CLASSIFICATION}_dense")(x)
    return layers.Activation("sigmoid", dtype="float32", name=CLASSIFICATION)(x)


def assemble(inputs, main, auxiliary: Sequence = (), classification=None, *, name: str) -> keras.Model:
    """The builder's model: one output, or [main, *auxiliary, classification] when there are extras."""
    extras = [*auxiliary, *([] if classification is None else [classification])]
    return keras.Model(inputs, [main, *extras] if extras else main, name=name)


def with_stage_auxiliary(inputs, outputs, stages: dict[int, Any], deepest, n_out: int, activation: str | None,
                         *, name: str, deep_supervision: bool, classification_head: bool,
                         classification_dropout: float) -> keras.Model:
    """The model, with deep supervision on every decoder stage but the last (U-Net, LinkNet)
    and the classification head on ``deepest`` when asked for."""
    supervised = [(s, stages[s]) for s in sorted(stages, reverse=True) if s > 1]
    check_auxiliary(len(supervised), deep_supervision=deep_supervision,
                    classification_dropout=classification_dropout, decoder=name)
    auxiliary = deep_supervision_heads(supervised, n_out, activation) if deep_supervision else []
    classification = classification_output(deepest, classification_dropout) if classification_head else None
    return assemble(inputs, outputs, auxiliary, classification, name=name)


def _output_name(tensor) -> str:
    return tensor._keras_history[0].name


def output_roles(model: keras.Model) -> tuple[int, list[int], int | None]:
    """(main, auxiliary indices, classification index or None) of the model's outputs.

    The main output is the first; every other output must be an ``aux{k}_*`` head or
    ``classification``.
    """
    names = [_output_name(t) for t in model.outputs]
    auxiliary = [i for i, n in enumerate(names) if i and n.startswith(AUXILIARY_PREFIX)]
    classification = [i for i, n in enumerate(names) if i and n == CLASSIFICATION]
    if len(model.inputs) != 1 or len(auxiliary) + len(classification) != len(names) - 1:
        raise ValueError(f"model {model.name!r} must map one image to one prediction (plus auxiliary "
                         f"'{AUXILIARY_PREFIX}*' or '{CLASSIFICATION}' outputs); it has {len(model.inputs)} "
                         f"inputs and outputs {names}")
    return 0, auxiliary, (classification[0] if classification else None)


@keras.saving.register_keras_serializable(package="kseg")
class ImageChannel(layers.Layer):
    """[(B, H, W, C) per-pixel output, (B, 1) image probability] -> (B, H, W, C + 1): the
    probability repeated at every pixel as a last channel (float32)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, inputs):
        pixels, probability = inputs
        pixels = keras.ops.cast(pixels, "float32")
        channel = keras.ops.ones_like(pixels[..., :1]) * keras.ops.cast(probability, "float32")[:, None, None, :]
        return keras.ops.concatenate([pixels, channel], axis=-1)

    def compute_output_shape(self, input_shapes):
        pixels, _ = input_shapes
        return (*pixels[:-1], None if pixels[-1] is None else pixels[-1] + 1)


def main_model(model: keras.Model) -> keras.Model:
    """The one-output inference model of a builder's model (the model itself when it has one output).

    The auxiliary heads are left out. The classification head's probability, when there is one,
    becomes the output's last channel (``ImageChannel``, layer ``image_channel``), so that it
    travels through TTA, tiling, ensembling and out-of-fold files like any channel until
    ``kseg.tasks.semantic.postprocess`` takes it off to gate the mask.
    """
    if len(model.outputs) == 1:
        return model
    _, _, classification = output_roles(model)
    output = model.outputs[0]
    if classification is not None:
        output = ImageChannel(name="image_channel")([output, model.outputs[classification]])
    return keras.Model(model.inputs, output, name=model.name)
