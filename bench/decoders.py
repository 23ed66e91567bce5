"""Benchmark: training speed and size of every semantic decoder on one ResNet-50 encoder, against U-Net.

Run from the repository root: ``python bench/decoders.py [--size 256] [--batch 4] [--steps 3]
[--rounds 2] [--encoder resnet50] [--decoders unet,unetpp,fpn,deeplabv3plus,linknet]``. Random
weights and data (no download), TensorFlow backend, XLA off, float32.

Each decoder is built by ``kseg.models.build_model(name, encoder=..., n_classes=1)`` with its default
options and trained inside kseg's training graph (the weight map is an input, the pixel-weighted BCE
is in the graph), as ``make train`` runs it. Every variant is timed over whole ``train_on_batch``
steps (Adam) after two warm-up steps, in turn for ``--rounds`` rounds (best round kept, so load
drifts on all alike). The baseline is the plain U-Net decoder on the same encoder, measured in the
same run: each line prints parameters, images/s and the time ratio against it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssd import device_text  # noqa: E402

BASELINE = "unet"
DECODERS = ("unet", "unetpp", "fpn", "deeplabv3plus", "linknet")


def training_graphs(decoders, encoder: str, size: int, batch: int) -> tuple[dict, dict]:
    """name -> compiled training graph, and the batch they all train on."""
    import keras

    from kseg.models import build_model
    from kseg.tasks.semantic.training_graph import build_training_model

    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 3), dtype=np.float32)
    y = (rng.random((batch, size, size, 1)) > 0.5).astype(np.float32)
    data = {"image": x, "weight_map": np.ones_like(y), "target": y}
    graphs = {}
    for name in decoders:
        keras.utils.set_random_seed(0)
        inference = build_model(name, input_shape=(size, size, 3), n_classes=1,
                                encoder=None if encoder == "none" else encoder)
        graph = build_training_model(inference, loss="bce")
        graph.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=False)
        graphs[name] = (graph, inference.count_params())
    return graphs, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per decoder and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all decoders (best kept)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--encoder", default="resnet50", help="an encoder entry, or none for the plain encoder")
    parser.add_argument("--decoders", default=",".join(DECODERS), help="comma-separated model names")
    args = parser.parse_args()
    import keras

    if keras.backend.backend() != "tensorflow":
        print("bench/decoders.py measures the TensorFlow backend: run it with KERAS_BACKEND=tensorflow")
        return 0
    decoders = [d for d in args.decoders.split(",") if d]
    if BASELINE not in decoders:
        decoders.insert(0, BASELINE)
    start = time.perf_counter()
    print(device_text())
    graphs, data = training_graphs(decoders, args.encoder, args.size, args.batch)
    for name, (graph, _) in graphs.items():
        for _ in range(2):
            loss = graph.train_on_batch(data)
        assert np.isfinite(float(np.ravel(loss)[0])), f"{name}: loss is not finite"
    best = {name: float("inf") for name in graphs}
    for _ in range(args.rounds):
        for name, (graph, _) in graphs.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                graph.train_on_batch(data)
            best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
    base = best[BASELINE]
    print(f"decoders on {args.encoder}, {args.size}x{args.size}, batch {args.batch}, float32, XLA off, "
          f"training graph (pixel-weighted BCE), Adam")
    for name, seconds in best.items():
        params = graphs[name][1]
        print(f"{name:14s} {params / 1e6:6.2f} M parameters  {args.batch / seconds:6.2f} images/s  "
              f"{seconds * 1e3:7.0f} ms/step  time x{seconds / base:.2f} vs {BASELINE}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
