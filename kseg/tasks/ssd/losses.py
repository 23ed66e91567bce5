"""SSD multibox losses (hard negative mining, or RetinaNet focal) over default boxes, and the
per-image SSD targets. ``keras.ops`` only, fixed shapes: they run eagerly, in a ``tf.function``
and under ``jax.jit``.
"""

from __future__ import annotations

from keras import ops

from kseg.nn.box_ops import VARIANCES, encode_boxes, match_boxes
from kseg.nn.loss_ops import smooth_l1_positives


def _detection_inputs(target_offsets, target_labels, pred_offsets, pred_logits):
    """float32 offsets / logits and int32 labels."""
    target_offsets = ops.cast(ops.convert_to_tensor(target_offsets), "float32")
    pred_offsets = ops.cast(ops.convert_to_tensor(pred_offsets), "float32")
    pred_logits = ops.cast(ops.convert_to_tensor(pred_logits), "float32")
    labels = ops.cast(ops.convert_to_tensor(target_labels), "int32")
    return target_offsets, labels, pred_offsets, pred_logits


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
    loc = ops.sum(smooth_l1_positives(target_offsets, pred_offsets, positive))
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

    loc = ops.sum(smooth_l1_positives(target_offsets, pred_offsets, positive))
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
