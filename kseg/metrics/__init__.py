"""NumPy metrics: the competitions' mask and instance scores (``kseg.metrics.iou_map``, one image,
DSB 2018 rules), box detection mAP (:mod:`kseg.metrics.detection`), scores by metric name
(:mod:`kseg.metrics.scores`) and evaluators (:mod:`kseg.metrics.evaluators`)."""

from kseg.metrics.masks import (
    THRESHOLD_PERCENTS,
    airbus_f2,
    dice,
    intersections_unions,
    iou,
    iou_map,
    iou_map_per_threshold,
    iou_matrix,
    mean_iou_map,
    tgs_iou_map,
)

__all__ = [
    "THRESHOLD_PERCENTS",
    "airbus_f2",
    "dice",
    "intersections_unions",
    "iou",
    "iou_map",
    "iou_map_per_threshold",
    "iou_matrix",
    "mean_iou_map",
    "tgs_iou_map",
]
