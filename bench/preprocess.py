"""Benchmark: preprocessing the demo set with joblib n_jobs=2 vs n_jobs=1 (cache disabled).

Run from the repository root: ``python bench/preprocess.py``. Each timing writes into a fresh cache
folder so nothing is read back; the worker pool is started once before timing, as it is in a
real run that preprocesses several datasets or folds.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import joblib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import best_of, report  # noqa: E402

from kseg.core.config import load_config
from kseg.data.pipeline import preprocess_settings, train_reader
from kseg.data.preprocess import preprocess  # noqa: E402


def main() -> None:
    cfg = load_config("demo")
    reader = train_reader(cfg)
    base = dataclasses.replace(preprocess_settings(cfg), progress=False)
    scratch = Path(tempfile.mkdtemp(prefix="kseg-bench-"))
    runs = iter(range(1000))

    def run(n_jobs: int):
        settings = dataclasses.replace(base, n_jobs=n_jobs, cache_dir=str(scratch / str(next(runs))))
        return preprocess(reader, settings)

    joblib.Parallel(n_jobs=2)(joblib.delayed(abs)(i) for i in range(4))  # start the worker pool
    serial, parallel = run(1), run(2)
    for sample_id in serial.ids[:5]:
        a, b = serial.load(sample_id), parallel.load(sample_id)
        assert all(np.array_equal(a[k], b[k]) for k in a), f"n_jobs=2 differs on {sample_id}"
    print(f"demo set: {len(serial)} images")
    report("preprocess n_jobs=2 vs n_jobs=1", best_of(lambda: run(2), 3), best_of(lambda: run(1), 3))


if __name__ == "__main__":
    main()
