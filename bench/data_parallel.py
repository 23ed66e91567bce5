"""Benchmark: the demo U-Net's training images/s on one device against data parallelism over two,
on the JAX backend (``keras.distribution.DataParallel``), and the numbers that bound scaling.

Run from the repository root: ``python bench/data_parallel.py [--steps 6]``. Each setting runs in
its own process (the device count is fixed when JAX starts): one CPU device with a batch of 2
(the baseline), and two CPU devices (``JAX_NUM_CPU_DEVICES=2``) with a global batch of 4, 2 per
device -- how data parallelism is used. On one machine the two "devices" share the same cores, so
the ratio shows the cost of the split, not a gain; the gradient size printed alongside is what
every step all-reduces between real devices (see the README's scaling paragraph).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PER_DEVICE = 2


def time_setting(devices: int, steps: int) -> dict:
    import jax
    import keras
    import numpy as np

    assert len(jax.devices()) == devices, jax.devices()
    if devices > 1:
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    from train_step import build, random_batch, seconds_per_step

    # Without batch norm: its cross-device statistics add all-reduces inside the forward pass, which
    # XLA's CPU collectives can leave waiting on a 2-core machine (see the README).
    inference, training = build(mixed=False, xla=False, batch_norm=False)
    batch_size = PER_DEVICE * devices
    seconds = seconds_per_step(training, random_batch(batch_size), steps)
    gradient_bytes = sum(int(np.prod(v.shape)) * 4 for v in training.trainable_variables)
    return {"devices": devices, "batch": batch_size, "step_s": seconds, "images_per_s": batch_size / seconds,
            "parameters": inference.count_params(), "gradient_bytes": gradient_bytes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(time_setting(args.one, args.steps)))
        return 0
    results = {}
    for devices in (1, 2):
        env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
                   PYTHONPATH=os.pathsep.join([str(ROOT / "bench"), str(ROOT)]))
        proc = subprocess.run([sys.executable, __file__, "--one", str(devices), "--steps", str(args.steps)],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            print(f"{devices} device(s): failed\n{proc.stderr[-2000:]}")
            return 1
        results[devices] = json.loads(proc.stdout.strip().splitlines()[-1])
    one, two = results[1], results[2]
    print(f"U-Net 256x256, {one['parameters']:,} parameters, {one['gradient_bytes'] / 1e6:.1f} MB of float32 "
          f"gradients all-reduced per step; {os.cpu_count()} CPU cores")
    for result in (one, two):
        print(f"  {result['devices']} device(s), batch {result['batch']}: {result['step_s'] * 1e3:.0f} ms/step, "
              f"{result['images_per_s']:.2f} images/s")
    print(f"data-parallel over 2 devices vs 1 device: {two['images_per_s'] / one['images_per_s']:.2f}x images/s "
          "(same cores: a cost, not a gain)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
