"""Mixed precision chosen for the hardware: the compute dtype policy of a training run.

``train.mixed_precision``:

* ``auto`` (the default): half-precision compute only where the hardware makes it fast --
  bfloat16 on TPUs, on GPUs of compute capability 8.0 or more (Ampere, Hopper) and on CPUs with
  bfloat16 matrix instructions (AMX or AVX512-BF16, which oneDNN uses); float16 with loss scaling
  on GPUs of capability 7.x (Volta, Turing: T4, V100), which have float16 tensor cores but no
  bfloat16; float32 everywhere else (older GPUs, CPUs without those instructions, where bfloat16
  is emulated and slower).
* ``on`` / ``true``: half precision whatever the hardware (float16 on GPUs without bfloat16,
  bfloat16 elsewhere); ``bfloat16`` / ``float16`` force one; ``off`` / ``false``: float32.

Weights, the loss and the models' output layers stay float32 (Keras' ``mixed_*`` policies).
Under ``mixed_float16`` Keras' ``compile`` wraps the optimizer in a ``LossScaleOptimizer``, so
small float16 gradients do not underflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import keras

from kseg.core.schema import PRECISIONS as SETTINGS

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What the policy depends on: the kind of the first device, a GPU's compute capability,
    the CPU's instruction-set flags."""

    kind: str  # cpu | gpu | tpu
    capability: tuple[int, int] | None = None
    cpu_flags: frozenset[str] = frozenset()

    def describe(self) -> str:
        if self.kind == "gpu":
            return f"GPU of compute capability {'.'.join(map(str, self.capability or (0, 0)))}"
        if self.kind == "cpu":
            fast = [flag for flag in CPU_BF16_FLAGS if flag in self.cpu_flags]
            return "CPU with " + (" and ".join(fast) if fast else "no bfloat16 matrix instructions")
        return self.kind.upper()


def normalise(setting) -> str:
    """``train.mixed_precision`` as one of ``SETTINGS`` (YAML booleans mean on / off)."""
    if isinstance(setting, bool):
        return "on" if setting else "off"
    value = str(setting).strip().lower()
    value = {"true": "on", "false": "off", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(value, value)
    if value not in SETTINGS:
        raise ValueError(f"train.mixed_precision must be one of {', '.join(SETTINGS)} (or true/false), not {setting!r}")
    return value


def choose_policy(setting, hardware: Hardware) -> tuple[str, str]:
    """The Keras dtype policy for ``setting`` on ``hardware``, and why (for the log)."""
    setting = normalise(setting)
    if setting == "off":
        return "float32", "train.mixed_precision is off"
    if setting in ("bfloat16", "float16"):
        return f"mixed_{setting}", f"train.mixed_precision: {setting}"
    gpu_without_bf16 = hardware.kind == "gpu" and (hardware.capability or (0, 0)) < (8, 0)
    if setting == "on":
        return ("mixed_float16" if gpu_without_bf16 else "mixed_bfloat16"), f"on, {hardware.describe()}"
    if hardware.kind == "tpu" or (hardware.kind == "gpu" and not gpu_without_bf16):
        return "mixed_bfloat16", f"auto: {hardware.describe()} has fast bfloat16"
    if hardware.kind == "gpu" and (hardware.capability or (0, 0)) >= (7, 0):
        return "mixed_float16", f"auto: {hardware.describe()} has float16 tensor cores, no bfloat16"
    if hardware.kind == "cpu" and any(flag in hardware.cpu_flags for flag in CPU_BF16_FLAGS):
        return "mixed_bfloat16", f"auto: {hardware.describe()}"
    return "float32", f"auto: {hardware.describe()} has no fast half precision"


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's instruction-set flags from ``/proc/cpuinfo`` (empty where there is none)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def detect_hardware() -> Hardware:
    """The device training runs on, as the backend sees it."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_logical_devices("TPU"):
            return Hardware("tpu")
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
            return Hardware("gpu", tuple(capability) if capability else None)
    elif backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform == "tpu":
            return Hardware("tpu")
        if device.platform == "gpu":
            capability = getattr(device, "compute_capability", None)
            return Hardware("gpu", tuple(int(p) for p in str(capability).split(".")[:2]) if capability else None)
    return Hardware("cpu", cpu_flags=cpu_flags())


@contextlib.contextmanager
def mixed_precision(setting, hardware: Hardware | None = None) -> Iterator[tuple[str, str]]:
    """Keras' global dtype policy for ``setting`` while the block runs (a training run), the
    caller's policy again afterwards: models a notebook builds after ``train`` are not silently
    half precision. Yields the policy and why it was chosen."""
    previous = keras.config.dtype_policy()
    try:
        yield set_mixed_precision(setting, hardware)
    finally:
        keras.config.set_dtype_policy(previous)


def set_mixed_precision(setting, hardware: Hardware | None = None) -> tuple[str, str]:
    """Set Keras' global dtype policy for ``setting`` (see the module notes); returns the policy
    and why it was chosen."""
    if hardware is None:
        hardware = detect_hardware() if normalise(setting) in ("auto", "on") else Hardware("cpu")
    policy, why = choose_policy(setting, hardware)
    keras.mixed_precision.set_global_policy(policy)
    return policy, why
