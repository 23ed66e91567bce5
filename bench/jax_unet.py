"""Benchmark (JAX only, never imports TensorFlow): U-Net training images/s at 256 and 512 px in
float32 and mixed bfloat16, the model FLOP utilisation (MFU) they reach, and the augmented-batch
generator's rate beside them.

Run from the repository root on a machine with JAX (a GPU one has no TensorFlow):
``python bench/jax_unet.py [--sizes 256,512] [--batch 8] [--steps 10]`` (the JAX backend unless
``KERAS_BACKEND`` says otherwise). On a CPU it defaults to 256 px and 2 timed steps.

The model is the demo pipeline's U-Net (depth 4, 16 base filters, batch norm, mask+border head)
in its training graph (pixel-weighted BCE + Dice), as in ``bench/train_step.py``, whose FLOP count
it shares (2 x multiply-adds of every convolution; a training step taken as 3x the forward pass).
Each precision runs in its own process (the policy is global); a step is a whole
``train_on_batch`` call (host-to-device copy of the batch included) after three warm-up steps
(compilation). MFU is the achieved FLOP/s over the device's measured matrix-product rate in the
same precision (``jnp.dot`` of two 4096 x 4096 matrices), so it needs no table of peak figures.
The generator figure is the demo's augmented batches from ``bench/generator.py``'s loop (in
process, one worker) at the same crop sizes: the rate the input pipeline gives the step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# JAX unless told otherwise (``make bench`` sets nothing), and never TensorFlow, even where it is
# installed: the GPU machines have none, and Keras would import it opportunistically
# (keras.utils.set_random_seed seeds it when it can).
os.environ.setdefault("KERAS_BACKEND", "jax")
if os.environ["KERAS_BACKEND"] == "jax":
    sys.modules["tensorflow"] = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PRECISIONS = ("float32", "mixed_bfloat16")


def matmul_flops_per_s(dtype: str, n: int = 4096, repeats: int = 5) -> float:
    """The device's measured ``jnp.dot`` rate for two n x n matrices in ``dtype``."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype=dtype)
    dot = jax.jit(lambda x: x @ x)
    dot(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def time_one(precision: str, size: int, batch: int, steps: int) -> dict:
    import keras
    import numpy as np

    from kseg.models import build_model
    from kseg.tasks.semantic.training_graph import build_training_model
    from train_step import forward_flops

    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    inference = build_model("unet", input_shape=(size, size, 3), targets="mask+border", depth=4, base_filters=16,
                            batch_norm=True)
    training = build_training_model(inference, loss="bce_dice")
    training.compile(optimizer=keras.optimizers.Adam(1e-3))
    rng = np.random.default_rng(0)
    data = {"image": rng.random((batch, size, size, 3), dtype=np.float32),
            "weight_map": np.ones((batch, size, size, 1), np.float32),
            "target": (rng.random((batch, size, size, 2)) > 0.5).astype(np.float32)}
    for _ in range(3):
        loss = training.train_on_batch(data)
    assert np.isfinite(float(loss)), f"{precision} {size}: loss is not finite"
    start = time.perf_counter()
    for _ in range(steps):
        loss = training.train_on_batch(data)
    float(loss)  # waits for the last step
    seconds = (time.perf_counter() - start) / steps
    ceiling = matmul_flops_per_s("bfloat16" if "bfloat16" in precision else "float32")
    return {"precision": precision, "size": size, "step_s": seconds, "images_per_s": batch / seconds,
            "forward_flops": forward_flops(inference), "matmul_flops_per_s": ceiling}


def generator_rate(size: int) -> float:
    from generator import images_per_second

    from kseg.core.config import load_config
    from kseg.data.pipeline import preprocess_train

    cfg = load_config("demo")
    return images_per_second(cfg, preprocess_train(cfg), size, 1, False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", help="comma-separated sides (default 256,512; 256 on a CPU)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, help="timed steps (default 10; 2 on a CPU)")
    parser.add_argument("--one", nargs=2, metavar=("PRECISION", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.environ.get("KERAS_BACKEND") != "jax":
        print("bench/jax_unet.py measures the JAX backend: run it with KERAS_BACKEND=jax")
        return 0
    if args.one:
        print(json.dumps(time_one(args.one[0], int(args.one[1]), args.batch, args.steps)))
        return 0

    import jax

    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    args.sizes = args.sizes or ("256" if on_cpu else "256,512")
    args.steps = args.steps or (2 if on_cpu else 10)
    print(f"JAX {jax.__version__}, {len(jax.devices())} x {device.platform} {device.device_kind}; "
          f"U-Net depth 4, 16 filters, batch {args.batch}, {args.steps} timed steps")
    for size in (int(s) for s in args.sizes.split(",") if s.strip()):
        results = {}
        for precision in PRECISIONS:
            proc = subprocess.run([sys.executable, __file__, "--one", precision, str(size), "--batch",
                                   str(args.batch), "--steps", str(args.steps)],
                                  capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(f"{size}px {precision}: failed\n{proc.stderr[-2000:]}")
                continue
            results[precision] = json.loads(proc.stdout.strip().splitlines()[-1])
        feed = generator_rate(size)
        for precision, r in results.items():
            achieved = 3 * r["forward_flops"] * r["images_per_s"]
            print(f"{size}x{size} {precision:15s} {r['images_per_s']:8.1f} images/s {r['step_s'] * 1e3:8.1f} ms/step "
                  f"{achieved / 1e9:9,.0f} GFLOP/s, MFU {achieved / r['matmul_flops_per_s']:5.1%} of the measured "
                  f"{r['matmul_flops_per_s'] / 1e9:,.0f} GFLOP/s matmul")
        if len(results) == 2:
            print(f"{size}x{size} bfloat16 vs float32: "
                  f"{results['mixed_bfloat16']['images_per_s'] / results['float32']['images_per_s']:.2f}x")
        print(f"{size}x{size} generator (demo augmentation, in process): {feed:.0f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
