"""Benchmark: U-Net training images/s at 256x256, batch 8, with mixed precision / XLA on and off.

Run from the repository root: ``python bench/train_step.py [--steps 6]``. The model is the demo
pipeline's U-Net (depth 4, 16 base filters, batch norm, mask+border head) inside its training
graph (pixel-weighted BCE+Dice). Each setting runs in its own process (the precision policy is
global) and is timed over whole ``train_on_batch`` steps after two warm-up steps; the baseline is
float32 without XLA.

FLOPs are counted from the layer shapes (2 * multiply-adds of every convolution; a training step
is taken as 3x the forward pass: forward, gradient w.r.t. inputs, gradient w.r.t. weights). The
achieved FLOP/s are compared with two ceilings: a float32 matrix product of this machine (NumPy's
BLAS, all cores), and the nominal peak cores x clock x FLOPs/cycle (AVX-512: 64, AVX2+FMA: 32
single-precision FLOPs per cycle per core, i.e. two FMA units assumed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE, BATCH = 256, 8
SETTINGS = {
    "float32": {"mixed": False, "xla": False},
    "float32 + XLA": {"mixed": False, "xla": True},
    "mixed bfloat16": {"mixed": True, "xla": False},
    "mixed bfloat16 + XLA": {"mixed": True, "xla": True},
}


def build(mixed: bool, xla: bool, batch_norm: bool = True):
    import keras

    from kseg.engine.precision import set_mixed_precision
    from kseg.models import build_model
    from kseg.tasks.semantic.training_graph import build_training_model

    set_mixed_precision(mixed)
    keras.utils.set_random_seed(0)
    inference = build_model("unet", input_shape=(SIZE, SIZE, 3), targets="mask+border", depth=4,
                            base_filters=16, batch_norm=batch_norm)
    training = build_training_model(inference, loss="bce_dice")
    training.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=xla)
    return inference, training


def forward_flops(model) -> int:
    """2 x multiply-adds of every Conv2D / Conv2DTranspose for one image."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2DTranspose):
            _, h, w, c_in = layer.input.shape
            kh, kw = layer.kernel_size
            total += 2 * h * w * kh * kw * c_in * layer.filters
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, _ = layer.output.shape
            c_in = layer.input.shape[-1]
            kh, kw = layer.kernel_size
            total += 2 * h * w * kh * kw * c_in * layer.filters
    return int(total)


def random_batch(batch_size: int) -> dict:
    """Random images, an all-ones weight map and random mask+border targets (timing only)."""
    import numpy as np

    rng = np.random.default_rng(0)
    return {"image": rng.random((batch_size, SIZE, SIZE, 3), dtype=np.float32),
            "weight_map": np.ones((batch_size, SIZE, SIZE, 1), np.float32),
            "target": (rng.random((batch_size, SIZE, SIZE, 2)) > 0.5).astype(np.float32)}


def seconds_per_step(training, batch: dict, steps: int) -> float:
    """Mean wall time of ``train_on_batch`` over ``steps`` steps, after two warm-up steps."""
    for _ in range(2):
        training.train_on_batch(batch)
    start = time.perf_counter()
    for _ in range(steps):
        training.train_on_batch(batch)
    return (time.perf_counter() - start) / steps


def time_setting(name: str, steps: int) -> dict:
    inference, training = build(**SETTINGS[name])
    seconds = seconds_per_step(training, random_batch(BATCH), steps)
    return {"name": name, "step_s": seconds, "images_per_s": BATCH / seconds,
            "forward_flops": forward_flops(inference), "parameters": inference.count_params()}


def gemm_flops_per_s(n: int = 2048, repeats: int = 3) -> float:
    """float32 matrix-product FLOP/s on all cores: the practical ceiling of this machine."""
    import numpy as np

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = a.T.copy()
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def nominal_peak() -> tuple[float, str]:
    """cores x clock x single-precision FLOPs/cycle, read from /proc/cpuinfo (Linux)."""
    cores = os.cpu_count() or 1
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return float("nan"), "unknown CPU"
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    per_cycle, isa = (64, "AVX-512") if " avx512f" in flags else (32, "AVX2+FMA") if " fma" in flags else (8, "SSE")
    clock = (max(mhz) if mhz else float("nan")) * 1e6
    return cores * clock * per_cycle, f"{cores} cores x {clock / 1e9:.2f} GHz x {per_cycle} FLOPs/cycle ({isa})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--one", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(time_setting(args.one, args.steps)))
        return 0

    results = []
    for name in SETTINGS:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps)],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    gemm = gemm_flops_per_s()
    peak, peak_text = nominal_peak()
    base = next(r for r in results if r["name"] == "float32")
    flops = base["forward_flops"]
    print(f"U-Net depth 4, 16 filters, {base['parameters']:,} parameters; {SIZE}x{SIZE}, batch {BATCH}")
    print(f"forward {flops / 1e9:.2f} GFLOP/image, training step ~{3 * flops / 1e9:.2f} GFLOP/image")
    print(f"ceilings: float32 GEMM {gemm / 1e9:.0f} GFLOP/s measured; nominal {peak / 1e9:.0f} GFLOP/s "
          f"({peak_text})")
    for r in results:
        achieved = 3 * flops * r["images_per_s"]
        print(f"{r['name']:22s} {r['images_per_s']:6.2f} images/s  {r['step_s'] * 1e3:7.0f} ms/step  "
              f"{achieved / 1e9:6.1f} GFLOP/s = {achieved / gemm:5.1%} of GEMM, {achieved / peak:5.1%} of nominal  "
              f"speed-up vs float32 {r['images_per_s'] / base['images_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
