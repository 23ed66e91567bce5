"""Detection mean average precision (mAP) in NumPy, VOC-style and COCO-style.

Why: Kaggle detection competitions score with VOC mAP@0.5 or COCO mAP@[.5:.05:.95]. To pick
checkpoints and thresholds locally we need those numbers without a TensorFlow graph, without
writing COCO json files and without pycocotools' per-detection Python loops. This module gives the
same numbers as ``pycocotools.cocoeval.COCOeval`` (checked to 1e-6 in the tests) from plain arrays.

What:

- ``xywh_to_xyxy`` / ``xyxy_to_xywh``: box-format helpers.
- ``pairwise_iou``: vectorised (N, M) IoU matrix.
- ``match_detections``: COCO greedy matching for one image and one class.
- ``average_precision``: AP from per-detection true-positive flags ("voc" or "coco" interpolation).
- ``per_class_ap`` / ``detection_map``: AP per class and IoU threshold over a list of images, and
  its mean; ``voc_map`` and ``coco_map`` are the two usual settings.

Conventions:

- Boxes are ``(x_min, y_min, x_max, y_max)`` in pixels (float), the corner form of Pascal VOC and
  of torchvision. COCO json annotations are ``(x, y, w, h)``: convert with ``xywh_to_xyxy``.
- IoU uses no "+1" on widths and heights: ``w = x_max - x_min``. This is what COCOeval does
  (``maskUtils.iou`` on xywh boxes); the classic VOC devkit MATLAB code adds +1 (pixel-inclusive
  integer boxes), which we do not, for either method. Boxes with non-positive width or height
  have zero area; IoU with a zero union is 0.
- Matching (both methods) is COCOeval's greedy matching: detections in decreasing score order
  (stable sort, so ties keep input order), each takes the still-unmatched truth of highest
  IoU >= threshold (ties in IoU go to the later truth, as in COCOeval); non-ignored truths are
  preferred over ignored ones. A detection matched to an ignored truth is neither a true nor a
  false positive. NOTE: the VOC devkit instead looks only at the single max-IoU truth, matched or
  not, and counts the detection as a false positive if that truth is taken; results can differ
  slightly from the devkit when truths overlap each other.
- Ignored truths (optional ``"ignore"`` key: VOC "difficult", COCO out-of-area-range) do not count
  in the number of positives and can each absorb one detection. COCO "iscrowd" regions (matched
  many times, IoU over detection area) are not supported.
- Classes: the mean runs over the classes that have at least one non-ignored truth in the whole
  set. COCOeval gives such absent classes a precision of -1 and leaves them out of the mean; we
  leave them out the same way (their detections change nothing). If no class has a truth the mAP
  is undefined and ``detection_map`` raises ``ValueError``.
- ``max_dets`` (COCO's maxDets, 100 in ``coco_map``) keeps the top-scoring detections per image
  *per class*, exactly as COCOeval does; the VOC setting keeps all.
- Area range is COCO's "all" (no detection or truth is dropped by area).
"""

from __future__ import annotations

import contextlib
import io
from typing import Mapping, Sequence

import numpy as np

from kseg.core.boxes import as_boxes, pairwise_iou, xyxy_to_xywh

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "pycocotools_sets",
    "COCO_RECALL_THRESHOLDS",
    "average_precision",
    "coco_map",
    "detection_map",
    "match_detections",
    "per_class_ap",
    "voc_map",
]


# Built exactly as COCOeval's Params builds them (np.linspace, not np.arange), so that the
# floating-point thresholds compare identically.
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)


COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)


def _score_order(scores: np.ndarray) -> np.ndarray:
    # Stable descending sort (COCOeval: np.argsort(-scores, kind="mergesort")).
    return np.argsort(-scores, kind="mergesort")


def _greedy_match(iou_sorted: np.ndarray, iou_threshold: float, truth_ignore: np.ndarray):
    """Greedy matching on an IoU matrix whose rows are already in decreasing score order.

    Returns ``(matched, ignored)`` bool arrays over those rows."""
    n_det, n_truth = iou_sorted.shape
    matched = np.zeros(n_det, dtype=bool)
    ignored = np.zeros(n_det, dtype=bool)
    if n_det == 0 or n_truth == 0:
        return matched, ignored
    # COCOeval caps the threshold just below 1 so that IoU == 1 still matches at t = 1.0.
    thr = min(float(iou_threshold), 1 - 1e-10)
    taken = np.zeros(n_truth, dtype=bool)
    regular = ~truth_ignore
    for d in range(n_det):
        ok = (iou_sorted[d] >= thr) & ~taken
        if not ok.any():
            continue
        # Prefer non-ignored truths; among candidates, the highest IoU, the last one on ties.
        pool = ok & regular if (ok & regular).any() else ok
        cand = np.where(pool, iou_sorted[d], -np.inf)
        g = n_truth - 1 - int(np.argmax(cand[::-1]))
        taken[g] = True
        matched[d] = True
        ignored[d] = bool(truth_ignore[g])
    return matched, ignored


def match_detections(det_boxes, det_scores, truth_boxes, iou_threshold: float = 0.5,
                     truth_ignore=None, return_ignored: bool = False):
    """COCO-style greedy matching of one image's detections of one class to its truths.

    Detections are visited in decreasing score order (stable: equal scores keep input order); each
    takes the unmatched truth with the highest IoU >= ``iou_threshold``. Returns a bool array of
    true positives **in the original detection order**. With ``truth_ignore`` (bool per truth),
    detections matched to an ignored truth are not true positives; pass ``return_ignored=True`` to
    also get the bool array of those detections (to be left out of AP: neither TP nor FP).
    """
    dets = as_boxes(det_boxes)
    scores = np.asarray(det_scores, dtype=np.float64).reshape(-1)
    truths = as_boxes(truth_boxes)
    if scores.shape[0] != dets.shape[0]:
        raise ValueError(f"{dets.shape[0]} detection boxes but {scores.shape[0]} scores")
    ig = (np.zeros(truths.shape[0], dtype=bool) if truth_ignore is None
          else np.asarray(truth_ignore, dtype=bool).reshape(-1))
    if ig.shape[0] != truths.shape[0]:
        raise ValueError(f"{truths.shape[0]} truth boxes but {ig.shape[0]} ignore flags")
    order = _score_order(scores)
    matched_s, ignored_s = _greedy_match(pairwise_iou(dets[order], truths), iou_threshold, ig)
    tp = np.zeros(dets.shape[0], dtype=bool)
    ignored = np.zeros(dets.shape[0], dtype=bool)
    tp[order] = matched_s & ~ignored_s
    ignored[order] = ignored_s
    return (tp, ignored) if return_ignored else tp


def average_precision(tp, scores, n_truth: int, method: str = "voc") -> float:
    """Average precision of one class from per-detection true-positive flags.

    ``tp`` and ``scores`` cover every (non-ignored) detection of the class over the whole set, in
    any order: they are stably sorted by decreasing score here. ``n_truth`` is the number of
    (non-ignored) truths, which must be positive.

    - ``"voc"``: VOC2010+ all-point AP, the area under the monotone (right-to-left running max)
      precision envelope as a step function of recall.
    - ``"coco"``: COCOeval's 101-point AP: mean over recall thresholds ``linspace(0, 1, 101)`` of
      the envelope precision at the first rank whose recall reaches the threshold
      (``searchsorted(..., side="left")``); thresholds beyond the last recall count as 0.
    """
    if n_truth <= 0:
        raise ValueError("average_precision needs n_truth > 0")
    tp = np.asarray(tp, dtype=bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if tp.shape != scores.shape:
        raise ValueError(f"tp has shape {tp.shape} but scores {scores.shape}")
    if method not in ("voc", "coco"):
        raise ValueError(f"method must be 'voc' or 'coco', got {method!r}")
    if tp.size == 0:
        return 0.0
    tp = tp[_score_order(scores)]
    tp_cum = np.cumsum(tp, dtype=np.float64)
    fp_cum = np.cumsum(~tp, dtype=np.float64)
    recall = tp_cum / n_truth
    precision = tp_cum / (tp_cum + fp_cum)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    if method == "voc":
        mrec = np.concatenate([[0.0], recall])
        return float(np.sum((mrec[1:] - mrec[:-1]) * envelope))
    idx = np.searchsorted(recall, COCO_RECALL_THRESHOLDS, side="left")
    q = np.where(idx < recall.size, envelope[np.minimum(idx, recall.size - 1)], 0.0)
    return float(np.mean(q))


def _check_image(entry: Mapping, i: int, kind: str, with_scores: bool):
    boxes = as_boxes(entry.get("boxes", np.zeros((0, 4))))
    k = boxes.shape[0]
    labels = np.asarray(entry.get("labels", np.zeros(0)), dtype=np.int64).reshape(-1)
    if labels.shape[0] != k:
        raise ValueError(f"{kind}[{i}]: {k} boxes but {labels.shape[0]} labels")
    scores = None
    if with_scores:
        scores = np.asarray(entry.get("scores", np.zeros(0)), dtype=np.float64).reshape(-1)
        if scores.shape[0] != k:
            raise ValueError(f"{kind}[{i}]: {k} boxes but {scores.shape[0]} scores")
    ignore = entry.get("ignore") if not with_scores else None
    ignore = (np.zeros(k, dtype=bool) if ignore is None
              else np.asarray(ignore, dtype=bool).reshape(-1))
    if ignore.shape[0] != k:
        raise ValueError(f"{kind}[{i}]: {k} boxes but {ignore.shape[0]} ignore flags")
    return boxes, labels, scores, ignore


def per_class_ap(detections: Sequence[Mapping], truths: Sequence[Mapping],
                 iou_thresholds=(0.5,), method: str = "voc", max_dets: int | None = None,
                 ) -> dict[int, np.ndarray]:
    """AP per class and IoU threshold: ``{label: array of shape (len(iou_thresholds),)}``.

    ``detections[i]`` and ``truths[i]`` describe image ``i``: dicts with ``"boxes"`` (K, 4)
    corner form, ``"labels"`` (K,) int, ``"scores"`` (K,) for detections and an optional
    ``"ignore"`` (K,) bool for truths. Only classes with at least one non-ignored truth appear.
    ``max_dets`` keeps the top-scoring detections per image per class (COCO maxDets).
    """
    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} detection entries but {len(truths)} truth entries")
    if method not in ("voc", "coco"):
        raise ValueError(f"method must be 'voc' or 'coco', got {method!r}")
    thresholds = np.asarray(iou_thresholds, dtype=np.float64).reshape(-1)
    if thresholds.size == 0:
        raise ValueError("iou_thresholds is empty")
    dets = [_check_image(d, i, "detections", True) for i, d in enumerate(detections)]
    gts = [_check_image(t, i, "truths", False) for i, t in enumerate(truths)]

    n_truth: dict[int, int] = {}
    for _, labels, _, ignore in gts:
        for c, n in zip(*np.unique(labels[~ignore], return_counts=True)):
            n_truth[int(c)] = n_truth.get(int(c), 0) + int(n)

    n_t = thresholds.size
    # Per class: lists over images of (scores in per-image rank order, tp (T, k), kept (T, k)).
    acc: dict[int, list] = {c: [] for c in n_truth}
    for (d_boxes, d_labels, d_scores, _), (t_boxes, t_labels, _, t_ignore) in zip(dets, gts):
        for c in np.unique(d_labels):
            c = int(c)
            if c not in acc:
                continue  # class without truth: excluded like COCOeval's -1.
            sel = np.flatnonzero(d_labels == c)
            order = sel[_score_order(d_scores[sel])]
            if max_dets is not None:
                order = order[:max_dets]
            t_sel = t_labels == c
            iou = pairwise_iou(d_boxes[order], t_boxes[t_sel])
            ig = t_ignore[t_sel]
            tp = np.zeros((n_t, order.size), dtype=bool)
            keep = np.ones((n_t, order.size), dtype=bool)
            for j, thr in enumerate(thresholds):
                matched, ignored = _greedy_match(iou, thr, ig)
                tp[j] = matched & ~ignored
                keep[j] = ~ignored
            acc[c].append((d_scores[order], tp, keep))

    result: dict[int, np.ndarray] = {}
    for c in sorted(n_truth):
        aps = np.zeros(n_t)
        if acc[c]:
            # Image order then stable sort: the same tie-breaking as COCOeval.accumulate.
            scores = np.concatenate([s for s, _, _ in acc[c]])
            tp = np.concatenate([t for _, t, _ in acc[c]], axis=1)
            keep = np.concatenate([k for _, _, k in acc[c]], axis=1)
            for j in range(n_t):
                aps[j] = average_precision(tp[j][keep[j]], scores[keep[j]], n_truth[c], method)
        result[c] = aps
    return result


def detection_map(detections: Sequence[Mapping], truths: Sequence[Mapping],
                  iou_thresholds=(0.5,), method: str = "voc", max_dets: int | None = None) -> float:
    """Mean AP over classes with at least one truth and over ``iou_thresholds``.

    See ``per_class_ap`` for the input format. Raises ``ValueError`` when no class has a
    (non-ignored) truth, since the mean is then undefined. No detections at all gives 0.0.
    """
    aps = per_class_ap(detections, truths, iou_thresholds, method, max_dets)
    if not aps:
        raise ValueError("no class has a (non-ignored) ground-truth box: mAP is undefined")
    return float(np.mean(np.stack(list(aps.values()))))


def voc_map(detections: Sequence[Mapping], truths: Sequence[Mapping]) -> float:
    """Pascal VOC2010+ mAP@0.5 (all-point interpolation, every detection kept)."""
    return detection_map(detections, truths, iou_thresholds=(0.5,), method="voc")


def coco_map(detections: Sequence[Mapping], truths: Sequence[Mapping], max_dets: int = 100) -> float:
    """COCO mAP@[.5:.05:.95] (COCOeval ``stats[0]``): 101-point AP, maxDets per image per class,
    area range "all"."""
    return detection_map(detections, truths, iou_thresholds=COCO_IOU_THRESHOLDS, method="coco",
                         max_dets=max_dets)


def pycocotools_sets(detections: Sequence[Mapping], truths: Sequence[Mapping], n_classes: int,
                     image_size: tuple[int, int] = (640, 640)):
    """The same set as pycocotools ``COCO`` ground-truth and results objects, for cross-checks
    against ``COCOeval`` (needs pycocotools, a test and benchmark dependency). Image ids start at 1,
    classes are 1..``n_classes``, ``image_size`` is (height, width) for every image."""

    from pycocotools.coco import COCO

    height, width = image_size
    images, annotations, results = [], [], []
    for i, (det, gt) in enumerate(zip(detections, truths)):
        image_id = i + 1
        images.append({"id": image_id, "width": width, "height": height})
        for box, label in zip(xyxy_to_xywh(gt["boxes"]), gt["labels"]):
            x, y, w, h = (float(v) for v in box)
            # Annotation ids start at 1: COCOeval stores matched gt ids and treats 0 as unmatched.
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        for box, label, score in zip(xyxy_to_xywh(det["boxes"]), det["labels"], det["scores"]):
            results.append({"image_id": image_id, "category_id": int(label),
                            "bbox": [float(v) for v in box], "score": float(score)})
    with contextlib.redirect_stdout(io.StringIO()):
        gt_api = COCO()
        gt_api.dataset = {"images": images, "annotations": annotations,
                          "categories": [{"id": c, "name": str(c)} for c in range(1, n_classes + 1)]}
        gt_api.createIndex()
        dt_api = gt_api.loadRes(results)
    return gt_api, dt_api


def truth_entry(boxes, labels, ignore=None) -> dict:
    """One image's truth in the format of this module (``ignore`` optional)."""
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": np.asarray(labels, np.int64),
            "ignore": None if ignore is None else np.asarray(ignore, bool)}


def score_detections(detections: Sequence[Mapping], truths: Sequence[Mapping]) -> dict[str, float]:
    """VOC mAP@0.5 and COCO mAP@[.5:.95] of a validation set (0 when it holds no object)."""
    try:
        return {"map50": voc_map(detections, truths),
                "coco_map": coco_map(detections, truths, max_dets=max([100] + [len(d["boxes"]) for d in detections]))}
    except ValueError:  # no truth box in the whole set: mAP undefined
        return {"map50": 0.0, "coco_map": 0.0}
