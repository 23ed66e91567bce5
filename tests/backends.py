"""Run a snippet of test code on the JAX backend, in a fresh interpreter (the backend is fixed
when keras is first imported, and the test process already runs TensorFlow)."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@cache
def _compilation_cache() -> dict[str, str]:
    """One XLA compilation cache for the session's snippets, new each session: building a Keras
    model on JAX compiles every weight initializer shape by shape, and the tiny test models share
    most shapes (loading one: 20 s without, 1.4 s with the shapes cached). KSEG_TEST_JAX_CACHE=0: off."""
    if os.environ.get("KSEG_TEST_JAX_CACHE", "1") == "0" or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return {}
    folder = tempfile.mkdtemp(prefix="kseg-test-jax-cache-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return {"JAX_COMPILATION_CACHE_DIR": folder, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def run_on_jax(code: str, timeout: int = 300) -> None:
    """Run ``code`` with ``KERAS_BACKEND=jax``; it must print ``ok`` and exit 0."""
    env = dict(os.environ, KERAS_BACKEND="jax", **_compilation_cache())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
