"""Shared timing helpers for the benchmark scripts: best-of wall time and a one-line report."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeats: int = 5) -> float:
    """Best wall time of ``repeats`` calls, in seconds (the minimum is the least noisy estimate)."""
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _ms(seconds: float) -> str:
    """Milliseconds to three significant digits without scientific notation."""
    ms = seconds * 1e3
    digits = 0 if ms <= 0 else max(0, 2 - math.floor(math.log10(ms)))
    return f"{ms:.{digits}f} ms"


def report(name: str, candidate_s: float, baseline_s: float) -> float:
    """Print ``name: candidate X ms, baseline Y ms, speed-up Zx`` and return the speed-up."""
    speed_up = baseline_s / candidate_s if candidate_s > 0 else math.inf
    candidate, baseline = _ms(candidate_s), _ms(baseline_s)
    print(f"{name}: candidate {candidate}, baseline {baseline}, speed-up {speed_up:.1f}x")
    return speed_up
