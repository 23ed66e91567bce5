"""Benchmark: detector post-processing on TensorFlow's kernels against the keras.ops twins (the
previous implementation), with fixed synthetic scores (a trained model's load, not random weights').

Run from the repository root: ``python bench/detection_kernels.py [--repeats 5] [--batch 8]``.
TensorFlow backend, XLA off (as the pipelines). Two implementations, timed alternately in one run:

* ``library`` (candidate): what runs on TensorFlow now (``kseg.nn.kernels``): TensorFlow's NMS ops
  (``NonMaxSuppressionV5``, ``CombinedNonMaxSuppression``) and ``tf.image.crop_and_resize``, and
  the mask head run only on the rows that hold detections;
* ``twin`` (baseline): the ``keras.ops`` versions, which JAX runs and which TensorFlow ran before
  (``kseg.nn.kernels.portable_kernels``): NMS as one loop step per candidate, RoIAlign by gathers,
  fixed shapes (masks for every detection row).

Why synthetic scores: with random weights every softmax score sits near the score threshold, so
how many boxes reach NMS is arbitrary. Here the scores come from fixed synthetic objects instead:
* small SSD 256x256, 21 classes, 5376 default boxes: each image has 8 objects of random classes;
  a default box overlapping an object (IoU >= 0.3) scores its class by the overlap, every other
  box is confident background (class scores about 0.006, under the 0.01 threshold);
* the demo's CPU Mask R-CNN at 256x256 (``bench/maskrcnn.py``'s options): ~30 synthetic nuclei per
  image; the RPN's objectness follows each anchor's best IoU with a nucleus, and each RoI's class
  score its best IoU (above 0.5 is a detection), computed in the graph from the fixed nuclei.

Printed: per-stage times (SSD decode + class-wise NMS; Mask R-CNN proposals, 7x7 and 14x14
RoIAlign, detection layer), then whole inference models against their network alone: small-SSD
inference at ``--batch`` (target: within 2x of the network), and Mask R-CNN's cost after the
feature pyramid per image (target: cut at least 3x). Outputs of both implementations are checked
equal before timing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import best_of  # noqa: E402
from ssd import _sig3, device_text  # noqa: E402

IMPLEMENTATIONS = ("library", "twin")


def compiled(fn, name: str):
    """``fn`` as a tf.function traced under implementation ``name`` (traced now, on first call)."""
    import tensorflow as tf

    from kseg.nn.kernels import portable_kernels

    graph = tf.function(fn)
    concrete = {}

    def call(*args):
        key = tuple(tuple(a.shape) for a in args)
        if key not in concrete:
            with portable_kernels() if name == "twin" else contextlib.nullcontext():
                concrete[key] = graph.get_concrete_function(*args)
        return concrete[key](*args)

    return call


def materialise(out):
    import tensorflow as tf

    return tf.nest.map_structure(lambda t: t.numpy(), out)


def time_all(fns: dict, args: tuple, repeats: int) -> dict:
    """Best wall time per implementation, called in turn ``repeats`` times (load drifts on all alike)."""
    for fn in fns.values():
        materialise(fn(*args))  # trace + warm up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(best_of(lambda: materialise(fn(*args)), 1))
    return {name: min(t) for name, t in times.items()}


def print_times(label: str, times: dict, per: int = 1) -> None:
    parts = [f"{name} {times[name] * 1e3 / per:.2f} ms" for name in times]
    ratios = [f"{name} {times[name] / times['library']:.1f}x" for name in times if name != "library"]
    unit = "/image" if per > 1 else ""
    print(f"{label}{unit}: {', '.join(parts)}; library faster than: {', '.join(ratios)}")


def check_equal(outputs: dict, what: str, tolerance: float = 1e-5) -> None:
    """Every implementation's output equals the library's: indices and counts exactly, values to
    ``tolerance`` of the largest magnitude (float sums in another order; 1e-4 after a whole mask
    head has amplified them)."""
    reference = outputs["library"]
    for name, out in outputs.items():
        for key in reference:
            a, b = np.asarray(reference[key]), np.asarray(out[key])
            if a.dtype.kind in "iu":
                assert np.array_equal(a, b), f"{what}: {name} {key} differs from library"
            else:
                np.testing.assert_allclose(b, a, atol=tolerance * max(1.0, float(np.abs(a).max(initial=0))), err_msg=f"{what}: {name} {key}")


# ----------------------------------------------------------------------------- SSD


def ssd_logits(default_boxes: np.ndarray, batch: int, n_classes: int, seed: int = 0) -> np.ndarray:
    """Fixed (batch, N, n_classes) class logits of 8 synthetic objects per image (see the module notes)."""
    from kseg.core.boxes import iou_matrix

    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 0.3, (batch, len(default_boxes), n_classes)).astype(np.float32)
    logits[..., 0] += 8.0  # confident background: class scores ~exp(-8) * 21 ... well under 0.01
    for b in range(batch):
        wh = rng.uniform(0.08, 0.45, (8, 2))
        corner = rng.uniform(0.0, 1.0 - wh)
        objects = np.concatenate([corner, corner + wh], axis=1)
        iou = iou_matrix(objects, default_boxes.astype(np.float64))  # (8, N)
        best, which = iou.max(axis=0), iou.argmax(axis=0)
        classes = rng.integers(1, n_classes, len(objects))[which]
        near = best >= 0.3
        logits[b, near, classes[near]] += 8.0 + 12.0 * (best[near] - 0.3)
    return logits


def bench_ssd(args) -> None:
    import keras
    import tensorflow as tf
    from keras import layers, ops

    from kseg.tasks.ssd.model import DetectionDecoder, ssd, ssd_default_boxes_for

    size, n_classes = 256, 21
    keras.utils.set_random_seed(0)
    net = ssd((size, size, 3), n_classes, backbone="small")
    anchors = ssd_default_boxes_for(size, "small")
    decoder = DetectionDecoder(anchors, name="detections")
    rng = np.random.default_rng(0)

    for batch in (1, args.batch):
        images = rng.random((batch, size, size, 3), dtype=np.float32)
        offsets = np.asarray(net.predict_on_batch(images))[..., :4]
        predictions = tf.constant(np.concatenate([offsets, ssd_logits(anchors, batch, n_classes)], axis=-1))
        fns = {name: compiled(lambda p: decoder(p), name) for name in IMPLEMENTATIONS}
        check_equal({name: materialise(fn(predictions)) for name, fn in fns.items()}, "SSD decoder")
        valid = materialise(fns["library"](predictions))["valid"]
        times = time_all(fns, (predictions,), args.repeats)
        print_times(f"small SSD decode + class-wise NMS, batch {batch} ({valid.mean():.0f} detections/image)",
                    times, batch)

    # The whole inference model at --batch: network, synthetic class logits, decoder.
    batch = args.batch
    logits = ssd_logits(anchors, batch, n_classes)

    class FixedClassLogits(layers.Layer):
        def call(self, raw):
            return ops.concatenate([raw[..., :4], ops.convert_to_tensor(logits)], axis=-1)

    image = keras.Input((size, size, 3), batch_size=batch)
    whole = keras.Model(image, decoder(FixedClassLogits()(net(image))))
    images = tf.constant(rng.random((batch, size, size, 3), dtype=np.float32))
    fns = {name: compiled(lambda x: whole(x, training=False), name) for name in ("library", "twin")}
    fns["network alone"] = compiled(lambda x: net(x, training=False), "library")
    times = time_all(fns, (images,), args.repeats)
    ratio = times["library"] / times["network alone"]
    print(f"small SSD inference, batch {batch}: whole model {_sig3(batch / times['library'])} images/s "
          f"(twin {_sig3(batch / times['twin'])}), network alone {_sig3(batch / times['network alone'])} images/s: "
          f"whole/network {ratio:.2f}x (target <= 2x: {'met' if ratio <= 2 else 'NOT met'})")


# ----------------------------------------------------------------------------- Mask R-CNN


def maskrcnn_setup(batch: int):
    """(inference model, its pieces rewired with synthetic scores, images, nucleus boxes (B, T, 4))."""
    import keras
    from keras import layers, ops

    from kseg.core.boxes import iou_matrix
    from kseg.nn.box_ops import _iou_matrix
    from kseg.tasks.maskrcnn.batches import instance_targets
    from kseg.tasks.maskrcnn.model import mask_branch
    from maskrcnn import MAX_INSTANCES, SyntheticNuclei, build_maskrcnn

    size = 256
    model = build_maskrcnn(size)
    data = SyntheticNuclei(size)
    arrays = [data.arrays[i] for i in data.ids[:batch]]
    images = np.stack([a["image"] for a in arrays]).astype(np.float32) / 255
    truth = np.stack([instance_targets(a["target"], MAX_INSTANCES)[0] for a in arrays]).astype(np.float32)
    valid_truth = (truth[..., 2] > truth[..., 0])
    anchors = model.get_layer("proposals").anchors
    rng = np.random.default_rng(1)
    rpn_logits = np.empty((batch, len(anchors), 1), np.float32)
    for b in range(batch):
        best = iou_matrix(anchors.astype(np.float64), truth[b, valid_truth[b]].astype(np.float64)).max(axis=1)
        rpn_logits[b, :, 0] = 12.0 * (best - 0.4) + rng.normal(0.0, 0.5, len(anchors))

    class FixedObjectness(layers.Layer):
        def call(self, raw):
            return ops.convert_to_tensor(rpn_logits) + 0.0 * raw

    class OverlapClassLogits(layers.Layer):
        """Class-1 logit from each RoI's best IoU with a nucleus: > 0 (a detection) above IoU 0.5."""

        def call(self, rois, raw):
            best = ops.max(_iou_matrix(rois, ops.convert_to_tensor(truth)), axis=-1)  # (B, R)
            jitter = 0.3 * ops.sin(997.0 * rois[..., 0] + 911.0 * rois[..., 1])  # fixed, breaks ties
            one = 12.0 * (best - 0.5) + jitter
            return ops.stack([ops.zeros_like(one), one], axis=-1) + 0.0 * raw

    features, rpn = model.get_layer("features"), model.get_layer("rpn")
    proposal_layer, align7 = model.get_layer("proposals"), model.get_layer("roi_align")
    box, detect = model.get_layer("box_head"), model.get_layer("detections")
    align14, masks = model.get_layer("roi_align_masks"), model.get_layer("mask_head")

    image = keras.Input((size, size, 3), batch_size=batch)
    p = features(image)
    logits, deltas = rpn(p)
    proposals = proposal_layer(FixedObjectness()(logits), deltas)
    class_logits, box_deltas = box(align7([proposals, *p[:4]]))
    detections = detect(proposals, OverlapClassLogits()(proposals, class_logits), box_deltas)
    outputs = dict(detections)
    outputs["masks"] = mask_branch(detections, p, align14, masks)
    synthetic = keras.Model(image, outputs)
    stages = dict(features=features, rpn=rpn, proposal_layer=proposal_layer, align7=align7, align14=align14,
                  detect=detect, box=box, rpn_logits=rpn_logits, classes=OverlapClassLogits())
    return synthetic, stages, images


def bench_maskrcnn(args) -> None:
    import tensorflow as tf

    for batch in (1, 4):
        synthetic, s, images = maskrcnn_setup(batch)
        images = tf.constant(images)
        p = s["features"](images)
        logits, deltas = s["rpn"](p)
        logits = tf.constant(s["rpn_logits"])
        props = {name: compiled(lambda a, b: s["proposal_layer"](a, b), name) for name in IMPLEMENTATIONS}
        check_equal({n: {"p": materialise(f(logits, deltas))} for n, f in props.items()}, "proposals")
        print_times(f"Mask R-CNN proposals (1000 -> 500, IoU 0.7), batch {batch}",
                    time_all(props, (logits, deltas), args.repeats), batch)

        proposals = props["library"](logits, deltas)
        levels = tuple(p[:4])
        align = {name: compiled(lambda b, *maps: s["align7"]([b, *maps]), name) for name in ("library", "twin")}
        check_equal({n: {"a": materialise(f(proposals, *levels))} for n, f in align.items()}, "RoIAlign 7x7")
        print_times(f"Mask R-CNN RoIAlign 7x7 of 500 proposals, batch {batch}",
                    time_all(align, (proposals, *levels), args.repeats), batch)

        class_logits, box_deltas = s["box"](s["align7"]([proposals, *levels]))
        class_logits = s["classes"](proposals, class_logits)
        detect = {name: compiled(lambda a, b, c: s["detect"](a, b, c), name) for name in IMPLEMENTATIONS}
        check_equal({n: materialise(f(proposals, class_logits, box_deltas)) for n, f in detect.items()}, "detection")
        detections = materialise(detect["library"](proposals, class_logits, box_deltas))
        print_times(f"Mask R-CNN detection layer ({detections['valid'].mean():.0f} detections/image), batch {batch}",
                    time_all(detect, (proposals, class_logits, box_deltas), args.repeats), batch)
        boxes = tf.constant(detections["boxes"])
        align = {name: compiled(lambda b, *maps: s["align14"]([b, *maps]), name) for name in ("library", "twin")}
        print_times(f"Mask R-CNN RoIAlign 14x14 of {boxes.shape[1]} detection rows, batch {batch}",
                    time_all(align, (boxes, *levels), args.repeats), batch)

        whole = {name: compiled(lambda x: synthetic(x, training=False), name) for name in IMPLEMENTATIONS}
        whole["features alone"] = compiled(lambda x: s["features"](x, training=False), "library")
        outputs = {n: materialise(whole[n](images)) for n in IMPLEMENTATIONS}
        check_equal(outputs, "Mask R-CNN", tolerance=1e-4)
        times = time_all(whole, (images,), args.repeats)
        base = times.pop("features alone")
        after = {name: t - base for name, t in times.items()}
        print_times(f"Mask R-CNN after the pyramid (whole model minus features {base * 1e3 / batch:.1f} ms/image), "
                    f"batch {batch}", after, batch)
        cut = after["twin"] / after["library"]
        print(f"  whole model {_sig3(batch / times['library'])} images/s (twin {_sig3(batch / times['twin'])}); "
              f"post-pyramid cost cut {cut:.1f}x (target >= 3x: {'met' if cut >= 3 else 'NOT met'})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per implementation (best kept)")
    parser.add_argument("--batch", type=int, default=8, help="large SSD inference batch (also timed: 1)")
    args = parser.parse_args()
    import keras

    if keras.backend.backend() != "tensorflow":
        print("bench/detection_kernels.py compares TensorFlow's kernels: run it with KERAS_BACKEND=tensorflow")
        return 0
    start = time.perf_counter()
    print(device_text())
    print(f"repeats {args.repeats}, XLA off; implementations: {', '.join(IMPLEMENTATIONS)}")
    bench_ssd(args)
    bench_maskrcnn(args)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
