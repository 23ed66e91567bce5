"""Which implementation of the detector kernels runs: chosen here, and only here.

Non-maximum suppression and crop-and-resize / RoIAlign have two implementations with the same
results: TensorFlow's C++ kernels (``kseg.nn.tf_kernels``; data-dependent loops in native code,
5-12x faster on CPU) on the TensorFlow backend, and the ``keras.ops`` twins (fixed shapes, run on
every backend, under ``jax.jit`` too) elsewhere. Layers ask ``library_kernels()`` while their
graph is traced, so a model follows the backend it runs on and its saved file names no kernel.

``portable_kernels()`` forces the ``keras.ops`` twins on TensorFlow too (and the ``keras.ops`` code
behind host-side NumPy fast paths, ``numpy_fast_paths()``): the tests run both implementations
against the same NumPy references, and ``bench/`` times one against the other.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import keras

_forced_portable = False


def library_kernels() -> bool:
    """True when the TensorFlow kernels should run (the TensorFlow backend, not forced off)."""
    return not _forced_portable and keras.backend.backend() == "tensorflow"


def numpy_fast_paths() -> bool:
    """True unless ``portable_kernels()`` is on: host-side NumPy versions of ``keras.ops`` code
    (``rpn_targets``' box encoding, whose ``log`` rounds differently from the backend's in the last
    bit) run on every backend; forced off, the ``keras.ops`` code they replace runs, so a portable
    run computes exactly what the code before the fast paths did."""
    return not _forced_portable


@contextlib.contextmanager
def portable_kernels() -> Iterator[None]:
    """Within the block, graphs traced use the ``keras.ops`` twins on every backend."""
    global _forced_portable
    previous, _forced_portable = _forced_portable, True
    try:
        yield
    finally:
        _forced_portable = previous


__all__ = ["library_kernels", "numpy_fast_paths", "portable_kernels"]
