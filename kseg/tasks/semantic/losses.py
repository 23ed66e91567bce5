"""Segmentation losses: pixel-weighted BCE / CE, soft Dice, BCE+Dice, focal, Tversky / focal Tversky,
Lovasz hinge (plain or symmetric) and weighted combinations of them; and, at
the end of the module, the SSD multibox losses (hard negative mining or focal) over default boxes
and the Mask R-CNN losses (RPN objectness and boxes, box head class and boxes, mask head).

Each loss is a pair, as in Keras core: a pure function ``f(y_true, y_pred, weight_map=None, ...)``
returning a scalar, and a registered ``keras.losses.Loss`` subclass for ``compile(loss=...)``.
``get_loss(name, **kwargs)`` builds the class from a config string, ``loss_function(name)``
returns the function. The math is ``keras.ops`` only, so every backend runs it. A combination by
weight (``train.loss: {bce: 3, dice: 1, focal: 4}``) is ``combined_loss`` with ``weights`` and each
component's ``args``: the weighted sum of the components, each given the same weight map.

Shapes (channels last): ``y_pred`` is ``(B, H, W, C)``. Sigmoid losses take ``y_true`` as
``(B, H, W, C)`` in {0, 1} (or ``(B, H, W)`` when C is 1); ``weighted_ce`` takes integer class
indices ``(B, H, W)`` or ``(B, H, W, 1)`` and class probabilities ``(B, H, W, K)``. A weight map
is ``(B, H, W)``, ``(B, H, W, 1)`` (shared by the channels) or ``(B, H, W, C)``.

Normalisation, one rule for every pixel loss (BCE, CE, focal): the value is the MEAN over all
pixels (and channels) of ``w * l``. The U-Net energy is the sum of ``w * log p`` over pixels;
dividing by the pixel count rather than by ``sum(w)`` keeps the learning rate independent of the
image size, makes a zero weight remove its pixel outright (value and gradient), leaves the other
pixels' contribution unchanged when one weight changes (``sum(w*l)/sum(w)`` would rescale them
all), and with no weight map gives exactly the plain mean loss. Dice weights its sums
(``sum(w*y*p)``...), Lovasz scales each pixel's hinge error; in both a zero weight removes the
pixel. The batch value is the mean of per-image values (equal to the pixel mean for equal sizes).

The Loss classes follow Keras: a ``sample_weight`` of rank 1 or 2 weights images; one of rank 3
or more is the pixel weight map and gives the function's value, so
``WeightedBCE()(y, p, sample_weight=w) == weighted_bce(y, p, w)``.

Probabilities are clipped to ``[eps, 1 - eps]`` (``keras.config.epsilon()``) before any log;
``from_logits=True`` uses the stable log-sigmoid / log-softmax forms instead. kseg models output
probabilities, so every function defaults to ``from_logits=False`` -- Lovasz included: it turns
probabilities back into logits, ``log(p) - log(1 - p)`` on the clipped ``p`` (|logit| <= ~16 in
float32). Composed with the model's sigmoid this is the identity, so the gradient is the logit
gradient except for pixels saturated beyond the clip, which get none; a builder that exposes
logits can pass ``from_logits=True`` and avoid that.
"""

from __future__ import annotations

import inspect
from typing import Callable

import keras
import numpy as np
from keras import ops

from kseg.core.errors import ConfigError
from kseg.nn.loss_ops import clip_probabilities

__all__ = [
    "BCEDice",
    "FocalLoss",
    "LOSS_NAMES",
    "LovaszHinge",
    "SoftDice",
    "WeightedBCE",
    "WeightedCE",
    "bce_dice",
    "check_loss_args",
    "combined_loss",
    "focal_loss",
    "get_loss",
    "loss_function",
    "lovasz_hinge",
    "soft_dice",
    "tversky_loss",
    "weighted_bce",
    "weighted_ce",
]


_LOW_PRECISION = ("float16", "bfloat16")


# -- shared helpers ------------------------------------------------------------------------------
def _ndim(x) -> int:
    shape = getattr(x, "shape", None)
    return len(shape) if shape is not None else np.ndim(x)


def _prepare(y_true, y_pred, weight_map, sparse: bool = False):
    """Tensors in one float dtype (at least float32), targets and weights at the prediction's rank."""
    y_pred = ops.convert_to_tensor(y_pred)
    pred_dtype = keras.backend.standardize_dtype(y_pred.dtype)
    if not keras.backend.is_float_dtype(pred_dtype) or pred_dtype in _LOW_PRECISION:
        y_pred = ops.cast(y_pred, "float32")
    dtype = y_pred.dtype
    y_true = ops.convert_to_tensor(y_true)
    if sparse:
        if _ndim(y_true) == _ndim(y_pred):
            y_true = ops.squeeze(y_true, axis=-1)
        y_true = ops.cast(y_true, "int32")
    else:
        y_true = ops.cast(y_true, dtype)
        if _ndim(y_true) == _ndim(y_pred) - 1:
            y_true = ops.expand_dims(y_true, -1)
    if weight_map is not None:
        weight_map = ops.cast(ops.convert_to_tensor(weight_map), dtype)
        if sparse and _ndim(weight_map) == _ndim(y_pred):
            weight_map = ops.squeeze(weight_map, axis=-1)
        elif not sparse and _ndim(weight_map) == _ndim(y_pred) - 1:
            weight_map = ops.expand_dims(weight_map, -1)
    return y_true, y_pred, weight_map


def _per_image_mean(values, weight_map):
    """Mean over every axis but the batch of ``w * values`` -> ``(B,)``."""
    if weight_map is not None:
        values = values * weight_map
    return ops.mean(values, axis=tuple(range(1, _ndim(values))))


def _log_p_and_log_q(y_pred, from_logits: bool):
    """``(p, log p, log(1 - p))`` for sigmoid outputs, stable for logits, clipped for probabilities."""
    if from_logits:
        return ops.sigmoid(y_pred), -ops.softplus(-y_pred), -ops.softplus(y_pred)
    p = clip_probabilities(y_pred)
    return p, ops.log(p), ops.log1p(-p)


# -- per-image forms (B,) ---------------------------------------------------------------------------
def _bce_per_image(y_true, y_pred, weight_map=None, from_logits=False):
    y_true, y_pred, weight_map = _prepare(y_true, y_pred, weight_map)
    if from_logits:  # max(x, 0) - x*y + log(1 + exp(-|x|))
        elements = ops.relu(y_pred) - y_pred * y_true + ops.log1p(ops.exp(-ops.abs(y_pred)))
    else:
        _, log_p, log_q = _log_p_and_log_q(y_pred, False)
        elements = -(y_true * log_p + (1.0 - y_true) * log_q)
    return _per_image_mean(elements, weight_map)


def _ce_per_image(y_true, y_pred, weight_map=None, from_logits=False):
    labels, y_pred, weight_map = _prepare(y_true, y_pred, weight_map, sparse=True)
    if from_logits:
        log_p = ops.log_softmax(y_pred, axis=-1)
    else:
        log_p = ops.log(ops.clip(y_pred, keras.config.epsilon(), 1.0))
    one_hot = ops.one_hot(labels, y_pred.shape[-1], dtype=y_pred.dtype)
    return _per_image_mean(-ops.sum(one_hot * log_p, axis=-1), weight_map)


def _dice_per_image(y_true, y_pred, weight_map=None, smooth=1.0, from_logits=False):
    y_true, y_pred, weight_map = _prepare(y_true, y_pred, weight_map)
    p = ops.sigmoid(y_pred) if from_logits else y_pred
    spatial = tuple(range(1, _ndim(p) - 1))
    true_sum, pred_sum, overlap = y_true, p, y_true * p
    if weight_map is not None:
        true_sum, pred_sum, overlap = true_sum * weight_map, pred_sum * weight_map, overlap * weight_map
    intersection = ops.sum(overlap, axis=spatial)  # (B, C)
    total = ops.sum(true_sum, axis=spatial) + ops.sum(pred_sum, axis=spatial)
    dice = (2.0 * intersection + smooth) / (total + smooth)
    return 1.0 - ops.mean(dice, axis=-1)


def _tversky_per_image(y_true, y_pred, weight_map=None, alpha=0.3, beta=0.7, gamma=1.0, smooth=1.0,
                       from_logits=False):
    y_true, y_pred, weight_map = _prepare(y_true, y_pred, weight_map)
    p = ops.sigmoid(y_pred) if from_logits else y_pred
    spatial = tuple(range(1, _ndim(p) - 1))
    overlap, false_pos, false_neg = y_true * p, (1.0 - y_true) * p, y_true * (1.0 - p)
    if weight_map is not None:
        overlap, false_pos, false_neg = overlap * weight_map, false_pos * weight_map, false_neg * weight_map
    intersection = ops.sum(overlap, axis=spatial)  # (B, C)
    index = (intersection + smooth) / (intersection + alpha * ops.sum(false_pos, axis=spatial)
                                       + beta * ops.sum(false_neg, axis=spatial) + smooth)
    return ops.mean(ops.power(ops.relu(1.0 - index), gamma), axis=-1)


def _bce_dice_per_image(y_true, y_pred, weight_map=None, bce_weight=1.0, dice_weight=1.0, smooth=1.0,
                        from_logits=False):
    bce = _bce_per_image(y_true, y_pred, weight_map, from_logits=from_logits)
    dice = _dice_per_image(y_true, y_pred, weight_map, smooth=smooth, from_logits=from_logits)
    return bce_weight * bce + dice_weight * dice


def _focal_per_image(y_true, y_pred, weight_map=None, alpha=0.25, gamma=2.0, from_logits=False):
    y_true, y_pred, weight_map = _prepare(y_true, y_pred, weight_map)
    p, log_p, log_q = _log_p_and_log_q(y_pred, from_logits)
    cross_entropy = -(y_true * log_p + (1.0 - y_true) * log_q)
    p_t = y_true * p + (1.0 - y_true) * (1.0 - p)
    elements = ops.power(1.0 - p_t, gamma) * cross_entropy
    if alpha is not None:
        elements = (y_true * alpha + (1.0 - y_true) * (1.0 - alpha)) * elements
    return _per_image_mean(elements, weight_map)


def _lovasz_flat(errors, labels, valid):
    """Lovasz hinge of each row of ``(..., N)`` errors (Berman et al. 2018, ``lovasz_hinge_flat``).

    Pixels with ``valid == 0`` are Berman's ``ignore``: sorted last and left out of the counts.
    """
    key = ops.where(valid > 0, ops.stop_gradient(errors), float("-inf"))
    order = ops.argsort(-key, axis=-1)  # descending errors, ignored pixels at the end
    errors_sorted = ops.take_along_axis(errors, order, axis=-1)
    labels_sorted = ops.take_along_axis(labels * valid, order, axis=-1)
    valid_sorted = ops.take_along_axis(valid, order, axis=-1)
    gts = ops.sum(labels_sorted, axis=-1, keepdims=True)
    intersection = gts - ops.cumsum(labels_sorted, axis=-1)
    union = gts + ops.cumsum(valid_sorted - labels_sorted, axis=-1)
    jaccard = 1.0 - ops.divide_no_nan(intersection, union)
    # The Lovasz extension's gradient: successive differences of the sorted Jaccard losses.
    grad = ops.concatenate([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], axis=-1)
    return ops.sum(ops.relu(errors_sorted * valid_sorted) * grad, axis=-1)


def _lovasz_per_image(y_true, y_pred, weight_map=None, per_image=True, symmetric=False, from_logits=False):
    y_true, y_pred, weight_map = _prepare(y_true, y_pred, weight_map)
    if from_logits:
        logits = y_pred
    else:
        p = clip_probabilities(y_pred)
        logits = ops.log(p) - ops.log1p(-p)
    if symmetric:  # the background as a class of its own too (TGS Salt's winners): mean of both hinges
        return 0.5 * (_lovasz_of_logits(y_true, logits, weight_map, per_image)
                      + _lovasz_of_logits(1.0 - y_true, -logits, weight_map, per_image))
    return _lovasz_of_logits(y_true, logits, weight_map, per_image)


def _lovasz_of_logits(y_true, logits, weight_map, per_image):
    errors = 1.0 - logits * (2.0 * y_true - 1.0)
    valid = ops.ones_like(errors)
    if weight_map is not None:
        weight_map = weight_map * valid  # broadcast a shared map over the channels
        errors = errors * weight_map
        valid = ops.cast(weight_map > 0, errors.dtype)

    def rows(t):  # (B, H, W, C) -> (B, C, H*W), or (1, C, B*H*W) for one loss over the batch
        t = ops.moveaxis(t, -1, 1)
        if not per_image:
            t = ops.expand_dims(ops.moveaxis(t, 0, 1), 0)
        shape = ops.shape(t)
        return ops.reshape(t, (shape[0], shape[1], -1))

    loss = _lovasz_flat(rows(errors), rows(y_true), rows(valid))  # (B or 1, C)
    return ops.mean(loss, axis=-1)


# -- public functions (scalars) ---------------------------------------------------------------------
def weighted_bce(y_true, y_pred, weight_map=None, from_logits=False):
    """Binary cross-entropy of sigmoid outputs: mean over pixels and channels of ``w * bce``."""
    return ops.mean(_bce_per_image(y_true, y_pred, weight_map, from_logits=from_logits))


def weighted_ce(y_true, y_pred, weight_map=None, from_logits=False):
    """Softmax cross-entropy of integer class targets: mean over pixels of ``-w * log p[y]``."""
    return ops.mean(_ce_per_image(y_true, y_pred, weight_map, from_logits=from_logits))


def soft_dice(y_true, y_pred, weight_map=None, smooth=1.0, from_logits=False):
    """``1 - mean`` over images and channels of ``(2 sum(w y p) + s) / (sum(w y) + sum(w p) + s)``.

    Per image and channel, so small objects count as much as large ones; an empty target with an
    empty prediction scores 1 (loss 0) thanks to ``smooth``.
    """
    return ops.mean(_dice_per_image(y_true, y_pred, weight_map, smooth=smooth, from_logits=from_logits))


def bce_dice(y_true, y_pred, weight_map=None, bce_weight=1.0, dice_weight=1.0, smooth=1.0, from_logits=False):
    """``bce_weight * weighted_bce + dice_weight * soft_dice``, the weight map applied to both."""
    return ops.mean(_bce_dice_per_image(y_true, y_pred, weight_map, bce_weight=bce_weight,
                                        dice_weight=dice_weight, smooth=smooth, from_logits=from_logits))


def focal_loss(y_true, y_pred, weight_map=None, alpha=0.25, gamma=2.0, from_logits=False):
    """Sigmoid focal loss (Lin et al. 2017): mean over pixels of ``-w a_t (1 - p_t)^g log p_t``.

    ``alpha=None`` drops the class balance term; ``gamma=0`` gives (alpha-balanced) BCE. The
    mean over pixels replaces the paper's division by the number of positive anchors.
    """
    return ops.mean(_focal_per_image(y_true, y_pred, weight_map, alpha=alpha, gamma=gamma,
                                     from_logits=from_logits))


def lovasz_hinge(y_true, y_pred, weight_map=None, per_image=True, symmetric=False, from_logits=False):
    """Lovasz hinge (Berman et al. 2018) of binary masks, per image and channel by default.

    ``y_pred`` holds probabilities unless ``from_logits`` (see the module notes). A weight map
    scales each pixel's hinge error before the sort; a zero weight drops the pixel (``ignore``).
    ``per_image=False`` computes one loss over the whole batch per channel. ``symmetric=True``
    averages it with the hinge of the inverted problem (background as foreground, logits negated),
    so background and foreground errors count alike (TGS Salt's winners, whose images were often
    empty).
    """
    return ops.mean(_lovasz_per_image(y_true, y_pred, weight_map, per_image=per_image, symmetric=symmetric,
                                      from_logits=from_logits))


def tversky_loss(y_true, y_pred, weight_map=None, alpha=0.3, beta=0.7, gamma=1.0, smooth=1.0, from_logits=False):
    """``(1 - T)^gamma`` per image and channel, ``T = (TP + s) / (TP + alpha FP + beta FN + s)`` with
    weighted soft counts (Salehi et al. 2017; ``gamma < 1`` is the focal Tversky loss of Abraham and
    Khan 2019, e.g. 0.75). ``beta > alpha`` costs a missed pixel more than a false one; ``alpha =
    beta = 0.5`` is soft Dice with ``smooth`` doubled.
    """
    return ops.mean(_tversky_per_image(y_true, y_pred, weight_map, alpha=alpha, beta=beta, gamma=gamma,
                                       smooth=smooth, from_logits=from_logits))


def _combined_per_image(y_true, y_pred, weight_map=None, weights=None, args=None):
    args = dict(args or {})
    total = None
    for name, weight in dict(weights or {}).items():
        term = float(weight) * _PER_IMAGE[name](y_true, y_pred, weight_map, **dict(args.get(name) or {}))
        total = term if total is None else total + term
    return total


def combined_loss(y_true, y_pred, weight_map=None, weights=None, args=None):
    """``sum weights[name] * loss(name)``, e.g. ``weights={"bce": 3, "dice": 1, "focal": 4}``; ``args``
    maps a component to its keyword arguments (``{"focal": {"gamma": 1.0}}``). Sigmoid losses only
    (``ce`` takes class indices, the others masks)."""
    return ops.mean(_combined_per_image(y_true, y_pred, weight_map, weights=weights, args=args))


# -- Loss classes -------------------------------------------------------------------------------------
class _SegmentationLoss(keras.losses.Loss):
    """Keras Loss over per-image values; a pixel-shaped ``sample_weight`` is the weight map."""

    _per_image: Callable = None

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None and _ndim(sample_weight) >= 3:
            # Loss.__call__ hands only y_true and y_pred to call(); the weight map rides with
            # y_true so that reduction and distribution scaling stay Keras's own.
            return super().__call__((y_true, sample_weight), y_pred)
        return super().__call__(y_true, y_pred, sample_weight)

    def call(self, y_true, y_pred):
        weight_map = None
        if isinstance(y_true, tuple):
            y_true, weight_map = y_true
        return type(self)._per_image(y_true, y_pred, weight_map, **self._loss_args())

    def _loss_args(self) -> dict:
        raise NotImplementedError

    def get_config(self):
        return {**super().get_config(), **self._loss_args()}


@keras.saving.register_keras_serializable(package="kseg")
class WeightedBCE(_SegmentationLoss):
    """Keras Loss for ``weighted_bce``."""

    _per_image = staticmethod(_bce_per_image)

    def __init__(self, from_logits=False, reduction="sum_over_batch_size", name="weighted_bce", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = bool(from_logits)

    def _loss_args(self):
        return {"from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="kseg")
class WeightedCE(_SegmentationLoss):
    """Keras Loss for ``weighted_ce`` (integer class targets, softmax outputs)."""

    _per_image = staticmethod(_ce_per_image)

    def __init__(self, from_logits=False, reduction="sum_over_batch_size", name="weighted_ce", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = bool(from_logits)

    def _loss_args(self):
        return {"from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="kseg")
class SoftDice(_SegmentationLoss):
    """Keras Loss for ``soft_dice``."""

    _per_image = staticmethod(_dice_per_image)

    def __init__(self, smooth=1.0, from_logits=False, reduction="sum_over_batch_size", name="soft_dice",
                 dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.smooth = float(smooth)
        self.from_logits = bool(from_logits)

    def _loss_args(self):
        return {"smooth": self.smooth, "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="kseg")
class BCEDice(_SegmentationLoss):
    """Keras Loss for ``bce_dice``."""

    _per_image = staticmethod(_bce_dice_per_image)

    def __init__(self, bce_weight=1.0, dice_weight=1.0, smooth=1.0, from_logits=False,
                 reduction="sum_over_batch_size", name="bce_dice", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.smooth = float(smooth)
        self.from_logits = bool(from_logits)

    def _loss_args(self):
        return {"bce_weight": self.bce_weight, "dice_weight": self.dice_weight, "smooth": self.smooth,
                "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="kseg")
class FocalLoss(_SegmentationLoss):
    """Keras Loss for ``focal_loss``."""

    _per_image = staticmethod(_focal_per_image)

    def __init__(self, alpha=0.25, gamma=2.0, from_logits=False, reduction="sum_over_batch_size",
                 name="focal_loss", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.alpha = None if alpha is None else float(alpha)
        self.gamma = float(gamma)
        self.from_logits = bool(from_logits)

    def _loss_args(self):
        return {"alpha": self.alpha, "gamma": self.gamma, "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="kseg")
class LovaszHinge(_SegmentationLoss):
    """Keras Loss for ``lovasz_hinge``.

    With ``per_image=False`` the batch has one value, so per-image ``sample_weight`` does not apply.
    """

    @staticmethod
    def _per_image(y_true, y_pred, weight_map=None, per_image=True, symmetric=False, from_logits=False):
        return _lovasz_per_image(y_true, y_pred, weight_map, per_image=per_image, symmetric=symmetric,
                                 from_logits=from_logits)

    def __init__(self, per_image=True, symmetric=False, from_logits=False, reduction="sum_over_batch_size",
                 name="lovasz_hinge", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.per_image = bool(per_image)
        self.symmetric = bool(symmetric)
        self.from_logits = bool(from_logits)

    def _loss_args(self):
        return {"per_image": self.per_image, "symmetric": self.symmetric, "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="kseg")
class TverskyLoss(_SegmentationLoss):
    """Keras Loss for ``tversky_loss`` (``gamma < 1``: focal Tversky)."""

    _per_image = staticmethod(_tversky_per_image)

    def __init__(self, alpha=0.3, beta=0.7, gamma=1.0, smooth=1.0, from_logits=False,
                 reduction="sum_over_batch_size", name="tversky", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.alpha, self.beta, self.gamma, self.smooth = float(alpha), float(beta), float(gamma), float(smooth)
        self.from_logits = bool(from_logits)

    def _loss_args(self):
        return {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma, "smooth": self.smooth,
                "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="kseg")
class CombinedLoss(_SegmentationLoss):
    """Keras Loss for ``combined_loss``."""

    _per_image = staticmethod(_combined_per_image)

    def __init__(self, weights=None, args=None, reduction="sum_over_batch_size", name="combined", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        check_loss_args("combined", {"weights": weights, "args": args})
        self.weights = {str(k): float(v) for k, v in dict(weights).items()}
        self.args = {str(k): dict(v or {}) for k, v in dict(args or {}).items()}

    def _loss_args(self):
        return {"weights": dict(self.weights), "args": {k: dict(v) for k, v in self.args.items()}}


# -- registry -------------------------------------------------------------------------------------------
_REGISTRY: dict[str, tuple[Callable, type]] = {
    "bce": (weighted_bce, WeightedBCE),
    "ce": (weighted_ce, WeightedCE),
    "dice": (soft_dice, SoftDice),
    "bce_dice": (bce_dice, BCEDice),
    "focal": (focal_loss, FocalLoss),
    "lovasz": (lovasz_hinge, LovaszHinge),
    "tversky": (tversky_loss, TverskyLoss),
    "combined": (combined_loss, CombinedLoss),
}
_PER_IMAGE: dict[str, Callable] = {
    "bce": _bce_per_image, "dice": _dice_per_image, "bce_dice": _bce_dice_per_image, "focal": _focal_per_image,
    "lovasz": _lovasz_per_image, "tversky": _tversky_per_image,
}  # what a combination may hold: the sigmoid losses


LOSS_NAMES = tuple(name for name in _REGISTRY if name != "combined")  # a combination is a {name: weight} mapping


def _lookup(name: str) -> tuple[Callable, type]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    return _REGISTRY[name]


def loss_function(name: str) -> Callable:
    """The pure function registered as ``name`` (``f(y_true, y_pred, weight_map=None, **kwargs)``)."""
    return _lookup(name)[0]


def get_loss(name: str, **kwargs) -> keras.losses.Loss:
    """The Keras Loss registered as ``name``, e.g. ``get_loss("focal", gamma=1.0)``."""
    cls = _lookup(name)[1]
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"loss {name!r} does not take {sorted(kwargs)}: {error}") from None


def check_loss_args(name: str, kwargs: dict) -> None:
    """Raise ConfigError unless ``kwargs`` are keyword arguments of the function ``name`` (for
    ``combined``: known components with positive weights, each with its own valid arguments)."""
    if name == "combined":
        weights, args = dict(kwargs.get("weights") or {}), dict(kwargs.get("args") or {})
        unknown = sorted(set(kwargs) - {"weights", "args"})
        if unknown or not weights:
            raise ConfigError(f"a loss combination takes weights (e.g. {{bce: 3, dice: 1}}) and args; got {sorted(kwargs)}")
        for component, weight in weights.items():
            if component not in _PER_IMAGE:
                raise ConfigError(f"loss {component!r} cannot be combined; combine {', '.join(_PER_IMAGE)}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise ConfigError(f"loss combination weight of {component!r} must be a positive number, not {weight!r}")
        strays = sorted(set(args) - set(weights))
        if strays:
            raise ConfigError(f"loss arguments for {strays}, which the combination {sorted(weights)} does not hold")
        for component, component_args in args.items():
            check_loss_args(component, dict(component_args or {}))
        return
    parameters = inspect.signature(loss_function(name)).parameters
    allowed = [k for k in parameters if k not in ("y_true", "y_pred", "weight_map")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(f"loss {name!r} does not take {unknown}; it takes {allowed}")
