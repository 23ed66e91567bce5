"""Benchmark: Mask R-CNN inference and training images/s, and its batch building, against the U-Net's.

Run from the repository root: ``python bench/maskrcnn.py [--sizes 256,512] [--repeats 3]
[--batch 4] [--train-batch 4]``. Random weights (no download); XLA off, as the pipelines
(``train.xla: false``).

The model is the demo's CPU Mask R-CNN (``pipelines/demo_maskrcnn.yaml``: small backbone, width 16,
fpn_channels 32, fc_channels 256, mask_channels 32, rpn_post_nms 500, max_detections 300,
rois_per_image 128, max_instances 256), built at each of ``--sizes`` (square inputs, anchors and
RPN targets follow the size). Data: synthetic images of ~30 square or round nuclei each (nucleus
sides scale with the size, so 512 px is the 256 px picture at twice the resolution).

* Inference: the full inference model (features -> RPN -> proposals -> RoIAlign -> box head ->
  detection layer -> RoIAlign -> mask head) through ``predict_on_batch`` at batch 1 and
  ``--batch``; baseline = its nested ``features`` model alone (backbone + FPN P2-P6) in the same
  way, so the ratio is what the detection stages cost. Both are warmed up first (tracing is not
  timed). NOTE: random weights score every proposal about 0.5 against ``min_confidence`` 0.5, so
  the count of valid detections is arbitrary; the graph has fixed shapes (``rpn_post_nms``
  proposals, ``max_detections`` masks), so its cost barely depends on it.
* Training: whole ``train_on_batch`` steps (Adam) of ``maskrcnn_training_model`` at
  ``--train-batch`` on a ``MaskRCNNBatches`` batch (resize-only augmentation, so every nucleus is
  in it); baseline = the demo's U-Net (depth 4, 16 base filters, no batch norm, per-image input
  norm, targets mask+border) in ``build_training_model(..., loss="bce_dice")`` on a
  ``SegmentationBatches`` batch of the same images at the same size and batch. Two warm-up steps
  each first.
* Data: time to build batches of ``--train-batch`` with the demo's training augmentation
  (``microscopy``), per image: ``MaskRCNNBatches`` (augment + zoom, instance targets,
  ``rpn_targets``) vs ``SegmentationBatches`` (augment, mask+border targets) at the same size;
  ``rpn_targets`` alone is timed too, on the same images' instance targets.

Times are the best of ``--repeats`` calls, candidate and baseline called alternately.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import best_of, report  # noqa: E402
from ssd import _sig3, best_of_pair, device_text  # noqa: E402

# pipelines/demo_maskrcnn.yaml (model.args, with detection.max_detections) and the _base detection section.
MODEL_OPTIONS = dict(backbone="small", width=16, fpn_channels=32, fc_channels=256, mask_channels=32,
                     rpn_post_nms=500, min_confidence=0.5, input_norm="image", max_detections=300)
ROIS_PER_IMAGE = 128
MAX_INSTANCES = 256
# pipelines/_base.yaml + demo.yaml: the demo's U-Net.
UNET_OPTIONS = dict(depth=4, base_filters=16, batch_norm=False, dropout=0.0, input_norm="image",
                    targets="mask+border")
AUGMENT = "microscopy"
N_IMAGES = 8
NUCLEI = 30


class SyntheticNuclei:
    """A preprocessed-instance-dataset stand-in: ``N_IMAGES`` images of ``size`` px, each with
    ~``NUCLEI`` square or round nuclei (later ones may cover part of earlier ones)."""

    kind = "instance"

    def __init__(self, size: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:size, :size]
        scale = size / 256
        self.arrays = {}
        for n in range(N_IMAGES):
            labels = np.zeros((size, size), np.int32)
            for k in range(1, int(rng.integers(NUCLEI - 3, NUCLEI + 4)) + 1):
                r = rng.uniform(4, 11) * scale
                cy, cx = rng.uniform(r, size - r, 2)
                if rng.random() < 0.5:
                    inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
                else:
                    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                labels[inside] = k
            grey = np.where(labels > 0, rng.uniform(140, 220), 30.0) + rng.normal(0, 8, labels.shape)
            image = np.clip(grey, 0, 255).astype(np.uint8)[..., None].repeat(3, axis=2)
            self.arrays[f"s{n}"] = {"image": image, "target": labels}
        self.ids = list(self.arrays)

    def load(self, sample_id):
        return self.arrays[sample_id]

    def path(self, sample_id):
        return Path(__file__)  # only its size is read (the in-memory check)


def maskrcnn_batches(data, size: int, batch: int, train: bool):
    from kseg.tasks.maskrcnn.batches import MaskRCNNBatches, instance_augmentation
    from kseg.tasks.maskrcnn.model import maskrcnn_anchors

    return MaskRCNNBatches(data, None, input_size=(size, size), anchors=maskrcnn_anchors((size, size)),
                           augment=instance_augmentation(AUGMENT if train else "none", (size, size), train=train),
                           batch_size=batch, shuffle=False, max_instances=MAX_INSTANCES)


def segmentation_batches(data, size: int, batch: int, train: bool):
    from kseg.data.augment import build_augmentation
    from kseg.tasks.semantic.batches import SegmentationBatches

    return SegmentationBatches(data, None, batch_size=batch, crop_size=(size, size),
                               augment=build_augmentation(AUGMENT if train else "none", crop_size=(size, size)),
                               targets=UNET_OPTIONS["targets"], shuffle=False, output="graph", in_memory=True)


def build_maskrcnn(size: int):
    import keras

    from kseg.tasks.maskrcnn.model import maskrcnn

    keras.utils.set_random_seed(0)
    return maskrcnn((size, size, 3), **MODEL_OPTIONS)


def bench_inference(size: int, args) -> None:
    label = f"{size}x{size}"
    full = build_maskrcnn(size)
    features = full.get_layer("features")
    for m in (full, features):
        m.compile(jit_compile=False)
    rng = np.random.default_rng(0)
    data = SyntheticNuclei(size)
    stack = np.stack([a["image"] for a in data.arrays.values()]).astype(np.float32) / 255
    per_image = {}
    for batch in (1, args.batch):
        images = stack[np.arange(batch) % len(stack)] if batch <= len(stack) else \
            rng.random((batch, size, size, 3), dtype=np.float32)
        features.predict_on_batch(images)  # warm-up (traces)
        out = full.predict_on_batch(images)
        assert out["masks"].shape == (batch, MODEL_OPTIONS["max_detections"], 28, 28), out["masks"].shape
        cand, base = best_of_pair(lambda: full.predict_on_batch(images),
                                  lambda: features.predict_on_batch(images), args.repeats)
        per_image[batch] = cand / batch
        print(f"{label} inference, batch {batch}: full Mask R-CNN {_sig3(batch / cand)} images/s, "
              f"features only {_sig3(batch / base)} images/s "
              f"({out['valid'].mean():.0f} valid detections/image of {MODEL_OPTIONS['max_detections']})")
        report(f"  {label} batch {batch} full model (candidate) vs backbone+FPN only (baseline)", cand, base)
        print(f"  RPN+proposals+RoIAlign+heads+detection+masks add {(cand - base) * 1e3 / batch:.1f} ms/image "
              f"({(cand - base) / base:+.0%})")
    print(f"  batch {args.batch} vs batch 1 throughput (full model): {per_image[1] / per_image[args.batch]:.2f}x")


def bench_training(size: int, args) -> None:
    import keras

    from kseg.models import build_model
    from kseg.tasks.maskrcnn.model import maskrcnn_training_model
    from kseg.tasks.semantic.training_graph import build_training_model

    label = f"{size}x{size}"
    batch = args.train_batch
    data = SyntheticNuclei(size)
    mask_batch = maskrcnn_batches(data, size, batch, train=False)[0]
    unet_batch = segmentation_batches(data, size, batch, train=False)[0]

    training = maskrcnn_training_model(build_maskrcnn(size), rois_per_image=ROIS_PER_IMAGE,
                                       max_instances=MAX_INSTANCES, seed=0)
    training.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=False)
    keras.utils.set_random_seed(0)
    unet = build_training_model(build_model("unet", input_shape=(size, size, 3), **UNET_OPTIONS), loss="bce_dice")
    unet.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=False)
    for model, x in ((training, mask_batch), (unet, unet_batch)):
        for _ in range(2):
            value = float(model.train_on_batch(x))
        assert np.isfinite(value), f"{model.name} loss is not finite: {value}"
    cand, base = best_of_pair(lambda: training.train_on_batch(mask_batch),
                              lambda: unet.train_on_batch(unet_batch), args.repeats)
    instances = (mask_batch["gt_class_ids"] > 0).sum() / batch
    positives = (mask_batch["rpn_labels"] == 1).sum() / batch
    print(f"{label} training, batch {batch} ({instances:.0f} nuclei/image, {positives:.0f} positive anchors/image "
          f"of {mask_batch['rpn_labels'].shape[1]}, {ROIS_PER_IMAGE} RoIs/image): Mask R-CNN "
          f"{_sig3(batch / cand)} images/s, U-Net {_sig3(batch / base)} images/s")
    report(f"  {label} train step Mask R-CNN (candidate) vs U-Net (baseline)", cand, base)


def bench_data(size: int, args) -> None:
    from kseg.tasks.maskrcnn.batches import instance_targets
    from kseg.tasks.maskrcnn.model import maskrcnn_anchors
    from kseg.tasks.maskrcnn.rpn import rpn_targets

    label = f"{size}x{size}"
    batch = args.train_batch
    data = SyntheticNuclei(size)
    n_batches = len(data.ids) // batch
    mask = maskrcnn_batches(data, size, batch, train=True)
    seg = segmentation_batches(data, size, batch, train=True)
    mask[0], seg[0]  # noqa: B018  (warm-up: first calls set up albumentations / caches)

    def build_all(batches):
        return lambda: [batches[i] for i in range(n_batches)]

    cand, base = best_of_pair(build_all(mask), build_all(seg), args.repeats)
    images = n_batches * batch
    anchors = maskrcnn_anchors((size, size))
    truths = [instance_targets(a["target"], MAX_INSTANCES)[:2] for a in data.arrays.values()]
    rng = np.random.default_rng(0)
    rpn = best_of(lambda: [rpn_targets(boxes, ids, anchors, rng=rng) for boxes, ids in truths], args.repeats)
    rpn_per_image = rpn / len(truths)
    print(f"{label} batch building ({AUGMENT} augmentation, batches of {batch}, {len(anchors)} anchors): "
          f"MaskRCNNBatches {cand * 1e3 / images:.1f} ms/image (rpn_targets alone {rpn_per_image * 1e3:.1f} ms/image, "
          f"~{rpn_per_image / (cand / images):.0%}), SegmentationBatches {base * 1e3 / images:.1f} ms/image")
    report(f"  {label} batch build per image MaskRCNNBatches (candidate) vs SegmentationBatches (baseline)",
           cand / images, base / images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512", help="comma-separated input sides (multiples of 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (best kept)")
    parser.add_argument("--batch", type=int, default=4, help="large inference batch (also timed: 1)")
    parser.add_argument("--train-batch", type=int, default=4, help="training and batch-building batch size")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    start = time.perf_counter()
    print(device_text())
    print(f"repeats {args.repeats}, XLA off, random weights; Mask R-CNN options {MODEL_OPTIONS}, "
          f"rois_per_image {ROIS_PER_IMAGE}, max_instances {MAX_INSTANCES}")
    for size in sizes:
        bench_inference(size, args)
        bench_training(size, args)
        bench_data(size, args)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
