"""Benchmark: detection mAP (``voc_map`` / ``coco_map``) vs pycocotools' COCOeval on the same data.

Run from the repository root: ``python bench/detection_metric.py [--images 200] [--repeats 3]``.

Synthetic, seeded set: ``--images`` images, 3 classes, about 30 truths per image (0-20 of each
class) and about 60 detections (each truth found 0, 1 or 2 times with jittered boxes, plus false
positives scattered over the image), continuous scores. The numbers must agree before anything
is timed: ``coco_map`` equals COCOeval ``stats[0]`` (mAP@[.5:.95]) and the 101-point AP at IoU 0.5
equals ``stats[1]``, both to 1e-6.

Timed: ours from the lists of per-image dicts (NumPy arrays, xyxy pixels); COCOeval from COCO
objects built once outside the timing (json-style dicts, ``loadRes``), each call a fresh
``COCOeval(...)`` + ``evaluate`` + ``accumulate`` + ``summarize`` with stdout suppressed. COCOeval
also evaluates the small / medium / large area ranges (4 in all) for its 12 stats; a second
baseline restricts it to area "all" and skips ``summarize`` -- the same work as ``coco_map``.
``voc_map`` (one IoU threshold, all-point AP) is compared with COCOeval restricted to
``iouThrs = [0.5]`` -- the same matching work; the AP values differ by definition (VOC all-point vs
COCO 101-point interpolation), so only its ``stats[1]`` is checked against ours at 0.5.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import best_of, report  # noqa: E402

from kseg.metrics.detection import coco_map, detection_map, pycocotools_sets, voc_map

N_CLASSES = 3
IMAGE_SIDE = 640


def synthetic_set(seed: int, n_images: int):
    """Per-image truth and detection dicts (xyxy pixels), ~30 truths and ~60 detections each."""
    rng = np.random.default_rng(seed)
    detections, truths = [], []
    for _ in range(n_images):
        t_boxes, t_labels, d_boxes, d_labels, d_scores = [], [], [], [], []
        for c in range(1, N_CLASSES + 1):
            n = int(rng.integers(0, 21))  # mean 10 per class
            wh = rng.uniform(8, 160, (n, 2))
            xy = rng.uniform(0, IMAGE_SIDE - wh)
            boxes = np.concatenate([xy, xy + wh], axis=1)
            t_boxes.append(boxes)
            t_labels += [c] * n
            for box, size in zip(boxes, wh):
                for _ in range(int(rng.choice([0, 1, 1, 2, 2]))):  # missed / found / found twice
                    d_boxes.append(box + rng.normal(0, 0.1, 4) * np.concatenate([size, size]))
                    d_labels.append(c)
                    d_scores.append(rng.uniform(0.2, 1.0))
        n_fp = int(rng.integers(10, 31))  # false positives anywhere, lower scores on average
        wh = rng.uniform(8, 160, (n_fp, 2))
        xy = rng.uniform(0, IMAGE_SIDE - wh)
        d_boxes += list(np.concatenate([xy, xy + wh], axis=1))
        d_labels += list(rng.integers(1, N_CLASSES + 1, n_fp))
        d_scores += list(rng.uniform(0.0, 0.8, n_fp))
        truths.append({"boxes": np.concatenate(t_boxes).reshape(-1, 4), "labels": np.asarray(t_labels, int)})
        detections.append({"boxes": np.asarray(d_boxes, float).reshape(-1, 4),
                           "labels": np.asarray(d_labels, int), "scores": np.asarray(d_scores, float)})
    return detections, truths


def coco_apis(detections, truths):
    """pycocotools COCO ground truth and results objects for the same set (built once)."""
    return pycocotools_sets(detections, truths, N_CLASSES, (IMAGE_SIDE, IMAGE_SIDE))


def cocoeval_stats(gt_api, dt_api, iou_thresholds=None) -> np.ndarray:
    """A fresh COCOeval: evaluate + accumulate + summarize (stdout suppressed); its 12 stats."""
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt_api, dt_api, "bbox")
        if iou_thresholds is not None:
            ev.params.iouThrs = np.asarray(iou_thresholds, dtype=float)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def cocoeval_all_area(gt_api, dt_api) -> float:
    """COCOeval doing only our work: area range "all" only, evaluate + accumulate, no summarize;
    returns mAP@[.5:.95] at maxDets 100 from ``eval["precision"]`` as ``summarize`` computes it."""
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt_api, dt_api, "bbox")
        ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, ev.params.maxDets.index(100)]
    return float(np.mean(precision[precision > -1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of ours (best kept); COCOeval: 1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    detections, truths = synthetic_set(args.seed, args.images)
    n_truth = sum(len(t["labels"]) for t in truths)
    n_det = sum(len(d["labels"]) for d in detections)
    gt_api, dt_api = coco_apis(detections, truths)

    stats = cocoeval_stats(gt_api, dt_api)
    ours_coco = coco_map(detections, truths)
    ours_ap50 = detection_map(detections, truths, iou_thresholds=(0.5,), method="coco", max_dets=100)
    assert abs(ours_coco - stats[0]) <= 1e-6, f"coco_map {ours_coco} != COCOeval stats[0] {stats[0]}"
    assert abs(ours_ap50 - stats[1]) <= 1e-6, f"AP@0.5 {ours_ap50} != COCOeval stats[1] {stats[1]}"
    stats50 = cocoeval_stats(gt_api, dt_api, iou_thresholds=[0.5])
    assert abs(ours_ap50 - stats50[1]) <= 1e-6, f"AP@0.5 {ours_ap50} != COCOeval(0.5) stats[1] {stats50[1]}"
    all_area = cocoeval_all_area(gt_api, dt_api)
    assert abs(ours_coco - all_area) <= 1e-6, f"coco_map {ours_coco} != COCOeval area 'all' {all_area}"
    ours_voc = voc_map(detections, truths)
    print(f"{args.images} images, {N_CLASSES} classes, {n_truth / args.images:.1f} truths and "
          f"{n_det / args.images:.1f} detections per image (seed {args.seed})")
    print(f"COCO mAP@[.5:.95] {ours_coco:.6f} (COCOeval {stats[0]:.6f}), AP@0.5 101-point {ours_ap50:.6f} "
          f"(COCOeval {stats[1]:.6f}), VOC mAP@0.5 all-point {ours_voc:.6f}")

    candidate = best_of(lambda: coco_map(detections, truths), args.repeats)
    baseline = best_of(lambda: cocoeval_stats(gt_api, dt_api), 1)
    report("coco_map vs COCOeval evaluate+accumulate+summarize", candidate, baseline)
    baseline = best_of(lambda: cocoeval_all_area(gt_api, dt_api), 1)
    report("coco_map vs COCOeval evaluate+accumulate, area 'all' only", candidate, baseline)
    candidate = best_of(lambda: voc_map(detections, truths), args.repeats)
    baseline = best_of(lambda: cocoeval_stats(gt_api, dt_api, iou_thresholds=[0.5]), 1)
    report("voc_map vs COCOeval at IoU 0.5 only", candidate, baseline)


if __name__ == "__main__":
    main()
