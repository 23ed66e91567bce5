"""Run a snippet of test code on the JAX backend, in a fresh interpreter (the backend is fixed
when keras is first imported, and the test process already runs TensorFlow)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_on_jax(code: str, timeout: int = 300) -> None:
    """Run ``code`` with ``KERAS_BACKEND=jax``; it must print ``ok`` and exit 0."""
    env = dict(os.environ, KERAS_BACKEND="jax")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
