"""Benchmark: augmented training batches per second with 2 worker processes vs 1 (in-process).

Run from the repository root: ``python bench/generator.py``. Iterates whole epochs through Keras'
own PyDataset machinery (the path ``model.fit`` uses) on the demo set, microscopy augmentation,
128x128 crops, batch 8.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import report  # noqa: E402
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter  # noqa: E402

from kseg.config import load_config  # noqa: E402
from kseg.pipeline import make_batches, preprocess_train  # noqa: E402

EPOCHS = 3


def images_per_second(cfg, data, workers: int) -> float:
    overrides = {"workers": workers, "use_multiprocessing": workers > 1}
    cfg_g = dict(cfg.generator, **overrides)
    from kseg.config import Config

    cfg = Config({**cfg.to_dict(), "generator": cfg_g})
    train, _ = make_batches(cfg, data, data.ids, data.ids[:1])
    adapter = PyDatasetAdapter(train, shuffle=False)
    images, start = 0, time.perf_counter()
    for _ in range(EPOCHS):
        adapter.on_epoch_begin()
        for x, _y, _w in adapter.get_numpy_iterator():
            images += len(x)
        adapter.on_epoch_end()
    return images / (time.perf_counter() - start)


def main() -> None:
    cfg = load_config("demo")
    data = preprocess_train(cfg)
    one = images_per_second(cfg, data, 1)
    two = images_per_second(cfg, data, 2)
    print(f"workers=1: {one:.0f} images/s, workers=2 (processes): {two:.0f} images/s")
    report("generator workers=2 vs workers=1", 1 / two, 1 / one)


if __name__ == "__main__":
    main()
