"""Benchmark: SSD inference and training images/s: in-graph decode + NMS cost, mining vs focal loss.

Run from the repository root: ``python bench/ssd.py [--repeats 3] [--batch 8] [--train-batch 4]
[--size 256] [--skip-vgg] [--xla]``. Random weights (no download).

Two networks: SSD300 (VGG16 backbone, 300x300, 8732 default boxes) and the small CPU backbone at
``--size`` (default 256x256, 5376 boxes); ``--n-classes`` (default 21, VOC: 20 + background).

* Inference: ``ssd_inference_model`` (network + in-graph decode, softmax and class-wise NMS,
  fixed-shape output) called through ``predict_on_batch`` (a compiled ``tf.function``) at batch 1
  and ``--batch``; baseline = the bare network (raw offsets + logits) in the same way. Both are
  warmed up first, so tracing is not timed. The ratio shows the decode+NMS overhead. Checked
  first: the in-graph detections equal the ``DetectionDecoder`` applied eagerly to the bare
  network's output (valid counts and scores). NOTE: with random weights every class scores about
  1/n_classes >= the 0.01 score threshold on every box, so each class's NMS runs on the full
  ``pre_nms_top_k`` = 400 candidates: the NMS figure is a worst case; a trained model, whose
  class scores mostly fall below the threshold, costs the same (fixed shapes) in this graph.
* Training: ``ssd_training_model`` with ``multibox_loss`` (hard-negative mining: a double argsort
  over all boxes) vs the same with ``multibox_focal_loss`` (no mining) as baseline; whole
  ``train_on_batch`` steps (Adam) at ``--train-batch`` on targets from ``ssd_targets`` on random
  boxes (1-8 objects per image), after two warm-up steps.

Times are the best of ``--repeats`` calls, candidate and baseline called alternately. ``--xla`` compiles with
``jit_compile=True``; the default is off, as the pipelines (``train.xla: false``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import best_of, report  # noqa: E402


def _sig3(x: float) -> str:
    """Three significant digits (trailing zeros kept), no scientific notation."""
    if not math.isfinite(x) or x <= 0:
        return str(x)
    x = float(f"{x:.3g}")
    return f"{x:.{max(0, 2 - math.floor(math.log10(x)))}f}"


def best_of_pair(candidate, baseline, repeats: int) -> tuple[float, float]:
    """Best wall times of ``candidate`` and ``baseline``, called alternately: on shared cores the
    machine's load then drifts on both alike instead of on whichever ran second."""
    times = [(best_of(candidate, 1), best_of(baseline, 1)) for _ in range(max(1, repeats))]
    return min(t[0] for t in times), min(t[1] for t in times)


def device_text() -> str:
    import keras

    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = "CPU"
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        devices = f"{len(gpus)} GPU(s)" if gpus else "CPU only"
        threads = f", TF threads intra {tf.config.threading.get_intra_op_parallelism_threads() or 'auto'}"
    else:
        threads = ""
    return (f"Keras {keras.__version__}, backend {keras.backend.backend()}, {devices}; "
            f"{cpu}, {os.cpu_count()} cores{threads}")


def random_targets(rng: np.random.Generator, batch: int, default_boxes: np.ndarray, n_classes: int):
    """Stacked ``ssd_targets`` of ``batch`` images with 1-8 random boxes each (normalised coords)."""
    from keras import ops

    from kseg.tasks.ssd.losses import ssd_targets

    offsets, labels = [], []
    for _ in range(batch):
        n = int(rng.integers(1, 9))
        wh = rng.uniform(0.05, 0.5, (n, 2))
        xy = rng.uniform(0.0, 1.0 - wh)
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        classes = rng.integers(1, n_classes, n).astype(np.int32)
        o, lab = ssd_targets(boxes, classes, default_boxes)
        offsets.append(ops.convert_to_numpy(o))
        labels.append(ops.convert_to_numpy(lab))
    return np.stack(offsets).astype(np.float32), np.stack(labels).astype(np.int32)


def build(backbone: str, size: int, n_classes: int):
    import keras

    from kseg.tasks.ssd.model import ssd, ssd_default_boxes_for

    keras.utils.set_random_seed(0)
    net = ssd((size, size, 3), n_classes, backbone=backbone)
    return net, ssd_default_boxes_for(size, backbone)


def bench_inference(label: str, backbone: str, size: int, args) -> None:
    from kseg.tasks.ssd.model import DetectionDecoder, ssd_inference_model

    net, boxes = build(backbone, size, args.n_classes)
    full = ssd_inference_model(net, boxes)
    for m in (net, full):
        m.compile(jit_compile=args.xla)
    rng = np.random.default_rng(0)
    per_image = {}
    for batch in (1, args.batch):
        images = rng.random((batch, size, size, 3), dtype=np.float32)
        raw = net.predict_on_batch(images)  # warm-up (traces) + reference
        detections = full.predict_on_batch(images)
        eager = DetectionDecoder(boxes, name="eager_decoder")(raw)
        np.testing.assert_array_equal(np.asarray(eager["valid"]), detections["valid"])
        np.testing.assert_allclose(np.asarray(eager["scores"]), detections["scores"], rtol=1e-5, atol=1e-6)
        cand, base = best_of_pair(lambda: full.predict_on_batch(images),
                                  lambda: net.predict_on_batch(images), args.repeats)
        per_image[batch] = cand / batch
        print(f"{label} inference, batch {batch}: with decode+NMS {_sig3(batch / cand)} images/s, "
              f"network only {_sig3(batch / base)} images/s "
              f"({int(detections['valid'].mean())} detections/image kept)")
        report(f"  {label} batch {batch} decode+NMS (candidate) vs network only (baseline)", cand, base)
        print(f"  decode+NMS adds {(cand - base) * 1e3 / batch:.1f} ms/image "
              f"({(cand - base) / base:+.0%})")
    print(f"  batch {args.batch} vs batch 1 throughput (with decode+NMS): "
          f"{per_image[1] / per_image[args.batch]:.2f}x")


def bench_training(label: str, backbone: str, size: int, args) -> None:
    import keras

    from kseg.tasks.ssd.model import ssd_training_model

    rng = np.random.default_rng(1)
    batch = args.train_batch
    models = {}
    for loss in ("focal", "mining"):
        net, boxes = build(backbone, size, args.n_classes)
        training = ssd_training_model(net, boxes, loss=loss)
        training.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=args.xla)
        if loss == "focal":
            offsets, labels = random_targets(rng, batch, boxes, args.n_classes)
            data = {"image": rng.random((batch, size, size, 3), dtype=np.float32),
                    "target_offsets": offsets, "target_labels": labels}
        for _ in range(2):
            value = training.train_on_batch(data)
        assert np.isfinite(value), f"{loss} loss is not finite: {value}"
        models[loss] = training
    mining, focal = best_of_pair(lambda: models["mining"].train_on_batch(data),
                                 lambda: models["focal"].train_on_batch(data), args.repeats)
    results = {"mining": mining, "focal": focal}
    positives = int((data["target_labels"] > 0).sum())
    print(f"{label} training, batch {batch} ({positives / batch:.0f} positive boxes/image of "
          f"{data['target_labels'].shape[1]}): multibox+mining {_sig3(batch / results['mining'])} "
          f"images/s, focal {_sig3(batch / results['focal'])} images/s")
    report(f"  {label} train step mining (candidate) vs focal (baseline)", results["mining"], results["focal"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (best kept)")
    parser.add_argument("--batch", type=int, default=8, help="large inference batch (also timed: 1)")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="input side of the small backbone (multiple of 32)")
    parser.add_argument("--n-classes", type=int, default=21, help="classes including background")
    parser.add_argument("--skip-vgg", action="store_true", help="only the small backbone (quick run)")
    parser.add_argument("--xla", action="store_true", help="compile with jit_compile=True")
    args = parser.parse_args()

    print(device_text())
    print(f"repeats {args.repeats}, XLA {'on' if args.xla else 'off'}, {args.n_classes} classes, random weights")
    if not args.skip_vgg:
        bench_inference("SSD300 VGG16", "vgg16", 300, args)
        bench_training("SSD300 VGG16", "vgg16", 300, args)
    label = f"small {args.size}x{args.size}"
    bench_inference(label, "small", args.size, args)
    bench_training(label, "small", args.size, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
