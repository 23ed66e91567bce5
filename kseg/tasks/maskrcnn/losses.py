"""The five Mask R-CNN losses: RPN objectness and boxes, box-head class and boxes, mask head.
``keras.ops`` only, fixed shapes (padding rows carry a validity flag instead of being dropped).
"""

from __future__ import annotations

from keras import ops

from kseg.core.errors import ConfigError
from kseg.nn.loss_ops import clip_probabilities, smooth_l1_positives


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
    per_anchor = smooth_l1_positives(_float32(rpn_target_deltas), _float32(rpn_deltas), positive)
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
    per_roi = smooth_l1_positives(_float32(target_deltas), predicted, positive)
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
        p = clip_probabilities(ops.where(inside, outputs, 0.5))
        elements = -(targets * ops.log(p) + (1.0 - targets) * ops.log1p(-p))
    per_roi = ops.mean(elements, axis=(2, 3))  # every RoI has mh * mw pixels: mean of means = pixel mean
    return _mean_over(per_roi, positive)
