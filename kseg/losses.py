"""Segmentation losses: pixel-weighted BCE / CE, soft Dice, BCE+Dice, focal and Lovasz hinge; and, at
the end of the module, the SSD multibox losses (hard negative mining or focal) over default boxes
and the Mask R-CNN losses (RPN objectness and boxes, box head class and boxes, mask head).

Each loss is a pair, as in Keras core: a pure function ``f(y_true, y_pred, weight_map=None, ...)``
returning a scalar, and a registered ``keras.losses.Loss`` subclass for ``compile(loss=...)``.
``get_loss(name, **kwargs)`` builds the class from a config string, ``loss_function(name)``
returns the function. The math is ``keras.ops`` only, so every backend runs it.

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

from kseg.errors import ConfigError
from kseg.models.box_ops import VARIANCES, encode_boxes, match_boxes

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
    "focal_loss",
    "get_loss",
    "loss_function",
    "lovasz_hinge",
    "soft_dice",
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


def _clip(p):
    eps = keras.config.epsilon()
    return ops.clip(p, eps, 1.0 - eps)


def _log_p_and_log_q(y_pred, from_logits: bool):
    """``(p, log p, log(1 - p))`` for sigmoid outputs, stable for logits, clipped for probabilities."""
    if from_logits:
        return ops.sigmoid(y_pred), -ops.softplus(-y_pred), -ops.softplus(y_pred)
    p = _clip(y_pred)
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


def _lovasz_per_image(y_true, y_pred, weight_map=None, per_image=True, from_logits=False):
    y_true, y_pred, weight_map = _prepare(y_true, y_pred, weight_map)
    if from_logits:
        logits = y_pred
    else:
        p = _clip(y_pred)
        logits = ops.log(p) - ops.log1p(-p)
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


def lovasz_hinge(y_true, y_pred, weight_map=None, per_image=True, from_logits=False):
    """Lovasz hinge (Berman et al. 2018) of binary masks, per image and channel by default.

    ``y_pred`` holds probabilities unless ``from_logits`` (see the module notes). A weight map
    scales each pixel's hinge error before the sort; a zero weight drops the pixel (``ignore``).
    ``per_image=False`` computes one loss over the whole batch per channel.
    """
    return ops.mean(_lovasz_per_image(y_true, y_pred, weight_map, per_image=per_image, from_logits=from_logits))


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
    def _per_image(y_true, y_pred, weight_map=None, per_image=True, from_logits=False):
        return _lovasz_per_image(y_true, y_pred, weight_map, per_image=per_image, from_logits=from_logits)

    def __init__(self, per_image=True, from_logits=False, reduction="sum_over_batch_size", name="lovasz_hinge",
                 dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.per_image = bool(per_image)
        self.from_logits = bool(from_logits)

    def _loss_args(self):
        return {"per_image": self.per_image, "from_logits": self.from_logits}


# -- registry -------------------------------------------------------------------------------------------
_REGISTRY: dict[str, tuple[Callable, type]] = {
    "bce": (weighted_bce, WeightedBCE),
    "ce": (weighted_ce, WeightedCE),
    "dice": (soft_dice, SoftDice),
    "bce_dice": (bce_dice, BCEDice),
    "focal": (focal_loss, FocalLoss),
    "lovasz": (lovasz_hinge, LovaszHinge),
}
LOSS_NAMES = tuple(_REGISTRY)


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
    """Raise ConfigError unless ``kwargs`` are keyword arguments of the function ``name``."""
    parameters = inspect.signature(loss_function(name)).parameters
    allowed = [k for k in parameters if k not in ("y_true", "y_pred", "weight_map")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(f"loss {name!r} does not take {unknown}; it takes {allowed}")


# -- detection losses (SSD / RetinaNet) -------------------------------------------------------------
# Box-level losses for detection heads, kept apart from the pixel losses above: they take the
# (targets, predictions) of a batch of default boxes, not (y_true, y_pred, weight_map), so they
# are NOT in the ``loss_function`` / ``get_loss`` registry (whose signature and ``check_loss_args``
# are pixel-specific). Call them directly, e.g. from a custom ``compute_loss``.
#
# Shapes: ``target_offsets`` / ``pred_offsets`` (B, N, 4) SSD-encoded offsets (``encode_boxes``),
# ``target_labels`` (B, N) ints -- 0 background, 1..C-1 objects, negative (e.g. -1) "ignore this
# box" (no loss, no gradient, not counted) -- and ``pred_logits`` (B, N, C) raw logits, column 0
# the background. Everything is computed in float32 with fixed shapes (no boolean-mask gathers),
# so it runs eagerly, in a ``tf.function`` and under ``jax.jit``.


def _detection_inputs(target_offsets, target_labels, pred_offsets, pred_logits):
    """float32 offsets / logits and int32 labels."""
    target_offsets = ops.cast(ops.convert_to_tensor(target_offsets), "float32")
    pred_offsets = ops.cast(ops.convert_to_tensor(pred_offsets), "float32")
    pred_logits = ops.cast(ops.convert_to_tensor(pred_logits), "float32")
    labels = ops.cast(ops.convert_to_tensor(target_labels), "int32")
    return target_offsets, labels, pred_offsets, pred_logits


def _smooth_l1_positives(target_offsets, pred_offsets, positive):
    """Smooth L1 (Huber, delta 1) summed over the 4 coordinates, zero off the positives: (B, N).

    The difference is zeroed before the Huber term (not the loss after it), so arbitrary or
    non-finite offsets stored for background / ignored boxes cannot leak NaN into value or gradient.
    """
    diff = ops.where(positive[..., None], pred_offsets - target_offsets, 0.0)
    abs_diff = ops.abs(diff)
    quadratic = ops.minimum(abs_diff, 1.0)
    return ops.sum(0.5 * quadratic * quadratic + (abs_diff - quadratic), axis=-1)


def multibox_loss(target_offsets, target_labels, pred_offsets, pred_logits, neg_pos_ratio=3.0, alpha=1.0,
                  min_negatives=0):
    """SSD multibox loss (Liu et al. 2016) with hard-negative mining; a float32 scalar.

    ``L = (L_conf + alpha * L_loc) / max(P, 1)`` with P the number of positive boxes (label > 0)
    in the whole batch. ``L_loc`` is the smooth L1 of the positives' offsets, summed over the 4
    coordinates. ``L_conf`` is the softmax cross-entropy of the positives plus that of the hard
    negatives: per image, the negatives (label 0) are ranked by their background loss
    ``-log softmax(logits)[0]`` and the top ``k = max(floor(neg_pos_ratio * P_i), min_negatives)``
    are kept (all of them if the image has fewer), P_i being the image's positives. An image with
    no object thus contributes ``min_negatives`` negatives (none by default). Ignored boxes
    (label < 0) are never positives or negatives.

    The ranking is a double argsort of the stop-gradient background losses (rank of each box in
    descending order, non-negatives keyed -inf so they sort last), compared with each image's k:
    vectorised over the batch, fixed shapes, and no gradient through the selection -- a negative
    that is not selected gets exactly zero gradient. Ties in the background loss may select either
    box, which does not change the value.
    """
    target_offsets, labels, pred_offsets, pred_logits = _detection_inputs(
        target_offsets, target_labels, pred_offsets, pred_logits)
    n_classes = pred_logits.shape[-1]
    positive = labels > 0
    negative = ops.equal(labels, 0)

    log_probs = ops.log_softmax(pred_logits, axis=-1)
    one_hot = ops.one_hot(ops.maximum(labels, 0), n_classes, dtype="float32")
    cross_entropy = -ops.sum(one_hot * log_probs, axis=-1)  # (B, N); = -log p[0] for negatives

    # Hard-negative mining: rank the negatives of each image by background loss, keep the top k.
    key = ops.where(negative, ops.stop_gradient(-log_probs[..., 0]), float("-inf"))
    rank = ops.argsort(ops.argsort(-key, axis=-1), axis=-1)  # 0 = hardest negative
    num_pos = ops.sum(ops.cast(positive, "float32"), axis=-1, keepdims=True)  # (B, 1)
    num_keep = ops.maximum(ops.floor(neg_pos_ratio * num_pos), float(min_negatives))
    hard_negative = ops.logical_and(negative, ops.cast(rank, "float32") < ops.stop_gradient(num_keep))

    counted = ops.logical_or(positive, hard_negative)
    conf = ops.sum(ops.where(counted, cross_entropy, 0.0))
    loc = ops.sum(_smooth_l1_positives(target_offsets, pred_offsets, positive))
    return (conf + alpha * loc) / ops.maximum(ops.sum(num_pos), 1.0)


def multibox_focal_loss(target_offsets, target_labels, pred_offsets, pred_logits, gamma=2.0, alpha=0.25,
                        loc_weight=1.0):
    """RetinaNet-style loss (Lin et al. 2017): sigmoid focal loss instead of negative mining.

    Classification: every non-ignored box (label >= 0) and every foreground class 1..C-1 is an
    independent sigmoid; the target is the one-hot of the label over classes 1..C-1, so a
    background box has all-zero targets. ``pred_logits`` keeps the multibox layout (B, N, C) and
    its column 0 (background) is NOT used -- it gets no loss and zero gradient; background is
    "every class sigmoid low", as in RetinaNet. Per element
    ``-a_t (1 - p_t)^gamma log p_t`` (``a_t = alpha`` for a target 1, ``1 - alpha`` for a 0;
    ``alpha=None`` drops the balance term; ``gamma=0`` gives a-weighted sigmoid cross-entropy),
    computed from logits with the stable log-sigmoid forms.

    ``L = (sum focal + loc_weight * L_loc) / max(P, 1)``, ``L_loc`` the smooth L1 of the
    positives' offsets as in ``multibox_loss`` and P the batch's positive count. A float32 scalar.
    """
    target_offsets, labels, pred_offsets, pred_logits = _detection_inputs(
        target_offsets, target_labels, pred_offsets, pred_logits)
    n_classes = pred_logits.shape[-1]
    positive = labels > 0
    valid = labels >= 0

    logits = pred_logits[..., 1:]
    targets = ops.one_hot(ops.maximum(labels, 0), n_classes, dtype="float32")[..., 1:]
    log_p, log_q = -ops.softplus(-logits), -ops.softplus(logits)
    cross_entropy = -(targets * log_p + (1.0 - targets) * log_q)
    elements = cross_entropy
    if not (isinstance(gamma, (int, float)) and gamma == 0):  # 0 ** 0 has a NaN gradient on TF
        one_minus_p_t = targets * ops.sigmoid(-logits) + (1.0 - targets) * ops.sigmoid(logits)
        elements = ops.power(one_minus_p_t, gamma) * elements
    if alpha is not None:
        elements = (targets * alpha + (1.0 - targets) * (1.0 - alpha)) * elements
    focal = ops.sum(ops.where(valid[..., None], elements, 0.0))

    loc = ops.sum(_smooth_l1_positives(target_offsets, pred_offsets, positive))
    num_pos = ops.sum(ops.cast(positive, "float32"))
    return (focal + loc_weight * loc) / ops.maximum(num_pos, 1.0)


def ssd_targets(truth_boxes, truth_labels, default_boxes, iou_threshold=0.5, variances=VARIANCES):
    """Training targets of ONE image: (encoded offsets (N, 4) float32, labels (N,) int32).

    ``match_boxes`` assigns the truths (``truth_boxes`` (T, 4) corner boxes, ``truth_labels``
    (T,) ints 1..C-1, rows <= 0 are padding) to the ``default_boxes`` (N, 4); ``encode_boxes``
    turns the matched boxes into SSD offsets. Background rows (label 0) encode their own default
    box, i.e. zero offsets, which the losses ignore anyway. Stack per-image results for a batch.
    """
    matched, labels = match_boxes(truth_boxes, truth_labels, default_boxes, iou_threshold=iou_threshold)
    return encode_boxes(matched, default_boxes, variances=variances), labels


__all__ += ["multibox_focal_loss", "multibox_loss", "ssd_targets"]


# -- Mask R-CNN losses ----------------------------------------------------------------------------------
# The five terms of Mask R-CNN (He et al. 2017), each a float32 scalar, added by the caller with
# its own weights. Like the SSD losses they are NOT in the pixel-loss registry; call them from a
# custom ``compute_loss``. Targets are built on the data side (anchors and RoIs already sampled and
# matched); padding and "ignore" are expressed through labels / masks, never by gathering, so the
# shapes stay fixed and the functions run eagerly, in a ``tf.function`` and under ``jax.jit``.
#
# Normalisation, as in the Matterport implementation: each loss is a mean over the counted items
# of the WHOLE batch (sum over the batch / number of counted items in the batch, at least 1), so
# an image with many sampled anchors or RoIs weighs more than one with few, and a batch with no
# counted item gives exactly 0 (no NaN). The box losses sum smooth L1 over the 4 coordinates and
# average over positives (Matterport averages over coordinates too, i.e. a quarter of this).
#
# Entries that are not counted (ignored anchors, padding RoIs, background RoIs, other classes'
# deltas and mask channels) are replaced by constants BEFORE any arithmetic, so whatever they hold
# (even NaN) leaks into neither value nor gradient; their gradient is exactly zero.


def _float32(x):
    return ops.cast(ops.convert_to_tensor(x), "float32")


def _int32(x):
    return ops.cast(ops.convert_to_tensor(x), "int32")


def _mean_over(values, counted):
    """``sum(values where counted) / max(count, 1)`` over the whole batch."""
    total = ops.sum(ops.where(counted, values, 0.0))
    return total / ops.maximum(ops.sum(ops.cast(counted, "float32")), 1.0)


def _select_class(values, class_ids, axis):
    """``values`` (B, N, ..., C, ...) taken at ``class_ids`` (B, N) along the class ``axis``.

    A one-hot ``where`` rather than a gather: fixed shapes, the other classes get exactly zero
    gradient, and non-finite values in them cannot leak. ``class_ids`` outside [0, C) select nothing
    (0), which only happens for rows the callers do not count.
    """
    n_classes = values.shape[axis]
    chosen = ops.cast(ops.one_hot(class_ids, n_classes, dtype="float32"), "bool")  # (B, N, C)
    for _ in range(2, axis):  # axes between the RoI axis and the class axis (mask pixels)
        chosen = ops.expand_dims(chosen, 2)
    for _ in range(axis + 1, len(values.shape)):  # axes after the class axis (box coordinates)
        chosen = ops.expand_dims(chosen, -1)
    return ops.sum(ops.where(chosen, values, 0.0), axis=axis)


def rpn_class_loss(rpn_labels, rpn_logits):
    """RPN objectness loss: sigmoid binary cross-entropy over the sampled anchors.

    ``rpn_labels`` (B, A) ints: 1 object, 0 background, negative (-1) ignored (not sampled: no loss,
    no gradient, not counted). ``rpn_logits`` (B, A, 1) or (B, A), one objectness logit per anchor.
    The mean over the non-ignored anchors of the whole batch (0 when there are none).
    """
    labels = _int32(rpn_labels)
    logits = _float32(rpn_logits)
    if len(logits.shape) == len(labels.shape) + 1:
        if logits.shape[-1] != 1:
            raise ConfigError(f"rpn_logits must be (B, A, 1) or (B, A) sigmoid logits, got shape {logits.shape}")
        logits = ops.squeeze(logits, axis=-1)
    counted = labels >= 0
    logits = ops.where(counted, logits, 0.0)
    targets = ops.cast(labels > 0, "float32")
    # max(x, 0) - x*y + log(1 + exp(-|x|)), the stable sigmoid cross-entropy of a logit
    cross_entropy = ops.relu(logits) - logits * targets + ops.log1p(ops.exp(-ops.abs(logits)))
    return _mean_over(cross_entropy, counted)


def rpn_box_loss(rpn_labels, rpn_target_deltas, rpn_deltas):
    """RPN box regression: smooth L1 (beta 1) summed over the 4 deltas, mean over positive anchors.

    ``rpn_labels`` (B, A) as in ``rpn_class_loss`` (only label > 0 counts); ``rpn_target_deltas``
    and ``rpn_deltas`` (B, A, 4) encoded against the anchors (``box_ops.encode_boxes``, BOX_VARIANCES).
    Targets stored for other anchors are never read.
    """
    positive = _int32(rpn_labels) > 0
    per_anchor = _smooth_l1_positives(_float32(rpn_target_deltas), _float32(rpn_deltas), positive)
    return _mean_over(per_anchor, positive)


def head_class_loss(target_class_ids, class_logits, roi_valid):
    """Box head classification: softmax cross-entropy over the real RoIs, mean over them.

    ``target_class_ids`` (B, N) ints, 0 background, 1..C-1 objects; ``class_logits`` (B, N, C);
    ``roi_valid`` (B, N): 1 for a sampled RoI, 0 for a padding row (any value > 0 counts, all equally).
    """
    counted = _float32(roi_valid) > 0
    logits = ops.where(counted[..., None], _float32(class_logits), 0.0)
    class_ids = ops.where(counted, _int32(target_class_ids), 0)
    log_probs = ops.log_softmax(logits, axis=-1)
    cross_entropy = -_select_class(log_probs, class_ids, axis=2)
    return _mean_over(cross_entropy, counted)


def head_box_loss(target_class_ids, target_deltas, box_deltas):
    """Box head regression: smooth L1 of the TARGET class's deltas, mean over positive RoIs.

    ``target_class_ids`` (B, N) ints (only > 0 counts: background and padding rows have 0);
    ``target_deltas`` (B, N, 4) encoded against the RoIs; ``box_deltas`` (B, N, C, 4), one set of
    deltas per class, of which only the target class's is used (the others get zero gradient).
    """
    class_ids = _int32(target_class_ids)
    positive = class_ids > 0
    predicted = _select_class(_float32(box_deltas), ops.where(positive, class_ids, 0), axis=2)  # (B, N, 4)
    per_roi = _smooth_l1_positives(_float32(target_deltas), predicted, positive)
    return _mean_over(per_roi, positive)


def mask_loss(target_class_ids, target_masks, mask_outputs, from_logits=True):
    """Mask head loss: per-pixel binary cross-entropy of the target class's mask on positive RoIs.

    ``target_class_ids`` (B, N) ints (only > 0 counts); ``target_masks`` (B, N, mh, mw) (or with a
    trailing 1) in [0, 1],
    the RoI's ground-truth mask resampled to the head's resolution; ``mask_outputs``
    (B, N, mh, mw, C): logits (``from_logits=True``) or sigmoid probabilities (clipped to
    ``[eps, 1 - eps]`` before the logs). Only channel ``target_class_ids`` is used, so classes do
    not compete. The mean over every pixel of the batch's positive RoIs (0 when there are none).
    """
    class_ids = _int32(target_class_ids)
    positive = class_ids > 0
    outputs = _select_class(_float32(mask_outputs), ops.where(positive, class_ids, 0), axis=4)  # (B, N, mh, mw)
    target_masks = _float32(target_masks)
    if len(target_masks.shape) == 5:  # (B, N, mh, mw, 1)
        target_masks = ops.squeeze(target_masks, axis=-1)
    inside = positive[..., None, None]
    targets = ops.where(inside, target_masks, 0.0)
    if from_logits:
        outputs = ops.where(inside, outputs, 0.0)
        elements = ops.relu(outputs) - outputs * targets + ops.log1p(ops.exp(-ops.abs(outputs)))
    else:
        p = _clip(ops.where(inside, outputs, 0.5))
        elements = -(targets * ops.log(p) + (1.0 - targets) * ops.log1p(-p))
    per_roi = ops.mean(elements, axis=(2, 3))  # every RoI has mh * mw pixels: mean of means = pixel mean
    return _mean_over(per_roi, positive)


__all__ += ["head_box_loss", "head_class_loss", "mask_loss", "rpn_box_loss", "rpn_class_loss"]
