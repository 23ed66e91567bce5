"""The semantic output head and its conventions: which target channels a model predicts
(mask, mask+border, mask+center, or softmax classes), the float32 ``logits`` layer and the
``probs`` activation every semantic builder ends with.
"""

from __future__ import annotations

from keras import layers

from kseg.core.errors import ConfigError
from kseg.tasks.semantic.targets import CHANNEL_NAMES as TARGET_NAMES  # noqa: F401 (re-exported)
from kseg.tasks.semantic.targets import target_channels

_ACTIVATIONS = ("sigmoid", "softmax", None)


AUTO = "auto"


def output_channels(targets: str) -> int:
    """Number of output channels for a target spec: "mask" -> 1, "mask+border" -> 2, ..."""
    return len(target_channels(targets))


def resolve_head(
    n_classes: int | None = None,
    targets: str | None = None,
    activation: str | None = AUTO,
) -> tuple[int, str | None]:
    """(channels, activation) of the head from the builder options.

    ``targets`` (multi-label sigmoid channels) and ``n_classes`` (output channels) may both be
    given only when they agree. ``activation="auto"``: sigmoid for one channel or for
    ``targets``, softmax (mutually exclusive classes, background included) otherwise.
    """
    if targets == "classes":  # one class-index target channel: the head has n_classes channels
        targets = None
    if targets is not None:
        n_out = output_channels(targets)
        if n_classes is not None and int(n_classes) != n_out:
            raise ConfigError(
                f"n_classes={n_classes} disagrees with targets={targets!r} ({n_out} channels); "
                "give only one of them"
            )
    else:
        n_out = 1 if n_classes is None else int(n_classes)
    if n_out < 1:
        raise ConfigError(f"n_classes must be >= 1, got {n_classes}")
    if activation == AUTO:
        activation = "sigmoid" if (targets is not None or n_out == 1) else "softmax"
    if activation == "linear":
        activation = None
    if activation not in _ACTIVATIONS:
        raise ConfigError(
            f"activation must be 'sigmoid', 'softmax', None or 'auto', got {activation!r}"
        )
    if activation == "softmax" and n_out == 1:
        raise ConfigError(
            "softmax over a single channel is constant 1; use activation='sigmoid' for one "
            "channel or n_classes >= 2 (background included) for softmax"
        )
    return n_out, activation


def output_head(logits_in, activation: str | None):
    """Attach the float32 ``"logits"`` layer and, when ``activation`` is set, ``"probs"``."""
    logits = layers.Activation("linear", dtype="float32", name="logits")(logits_in)
    if activation is None:
        return logits
    return layers.Activation(activation, dtype="float32", name="probs")(logits)


def segmentation_head(x, n_out: int, activation: str | None):
    """1x1 convolution to ``n_out`` channels (``"head"``) followed by ``output_head``."""
    x = layers.Conv2D(n_out, 1, padding="same", name="head")(x)
    return output_head(x, activation)
