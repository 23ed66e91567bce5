"""Concurrent spatial and channel squeeze & excitation (scSE, Roy et al., MICCAI 2018).

A decoder block's output is recalibrated twice and the two results combined:

    cSE(x) = x * sigmoid(W2 relu(W1 mean_hw(x) + b1) + b2)    (per channel; W1: C -> C // r)
    sSE(x) = x * sigmoid(w . x + b)                            (per pixel; a 1x1 conv to one map)
    scSE(x) = cSE(x) + sSE(x)        attention="scse"      (addition, as segmentation_models.pytorch)
    scSE(x) = max(cSE(x), sSE(x))    attention="scse_max"  (the paper's max-out variant)

with reduction r = 16 (at least one squeezed channel). Plain Keras layers only, so a model with
attention saves and reloads without custom objects and runs on TensorFlow and JAX.
"""

from __future__ import annotations

from keras import layers

from kseg.core.errors import ConfigError

ATTENTIONS = (None, "scse", "scse_max")
SCSE_REDUCTION = 16


def check_attention(attention: str | None) -> None:
    if attention not in ATTENTIONS:
        raise ConfigError(
            f"attention must be None, 'scse' (channel + spatial SE added) or 'scse_max' "
            f"(combined by maximum), got {attention!r}"
        )


def scse(x, *, name: str, reduction: int = SCSE_REDUCTION, combine: str = "add"):
    """scSE of ``x`` (B, H, W, C); layers ``{name}_cse_*``, ``{name}_sse_*``, output ``{name}_out``."""
    channels = int(x.shape[-1])
    gate = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_cse_pool")(x)
    gate = layers.Conv2D(max(1, channels // reduction), 1, activation="relu",
                         name=f"{name}_cse_reduce")(gate)
    gate = layers.Conv2D(channels, 1, activation="sigmoid", name=f"{name}_cse_expand")(gate)
    channel_se = layers.Multiply(name=f"{name}_cse")([x, gate])
    spatial = layers.Conv2D(1, 1, activation="sigmoid", name=f"{name}_sse_conv")(x)
    spatial_se = layers.Multiply(name=f"{name}_sse")([x, spatial])
    merge = {"add": layers.Add, "max": layers.Maximum}[combine]
    return merge(name=f"{name}_out")([channel_se, spatial_se])


def attend(x, attention: str | None, *, name: str):
    """Apply the ``attention`` option of a decoder to a block output (None: unchanged)."""
    check_attention(attention)
    if attention is None:
        return x
    return scse(x, name=name, combine="add" if attention == "scse" else "max")
