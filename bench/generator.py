"""Benchmark: augmented training batches per second with 2 workers vs 1 (in-process), and what a
fast accelerator would get of them.

Run from the repository root: ``python bench/generator.py``. Iterates epochs through Keras' own
PyDataset machinery (the path ``model.fit`` uses) on the demo set with the demo's augmentation,
targets and batch size, at the demo's 128x128 crops and at 256x256. Workers are tried as threads
and as processes; Keras starts a fresh process pool every epoch, so epochs are made long enough
(``STEPS`` batches) for that start-up to be a small share, as in a real run.

Then the same iteration feeds a synthetic consumer that trains at ``CONSUMER`` images/s (a GPU's
step rate; it waits without holding the GIL, as a device step does): the images/s it reaches show
whether the input pipeline keeps such an accelerator busy (it would reach ``CONSUMER``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import report  # noqa: E402
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter  # noqa: E402

from kseg.core.config import Config, load_config
from kseg.data.pipeline import preprocess_train
from kseg.tasks.semantic.batches import make_batches

EPOCHS = 3
STEPS = 40
CONSUMER = 500.0


def images_per_second(cfg: Config, data, crop: int, workers: int, processes: bool,
                      consumer: float | None = None) -> float:
    """Images/s through Keras' PyDataset iteration; with ``consumer``, each batch is then consumed
    by a step of ``len(batch) / consumer`` seconds."""
    settings = cfg.to_dict()
    settings["generator"] = dict(settings["generator"], workers=workers, use_multiprocessing=processes,
                                 crop_size=[crop, crop])
    settings["train"] = dict(settings["train"], steps_per_epoch=STEPS)
    train, _ = make_batches(Config(settings), data, data.ids, data.ids[:1])
    adapter = PyDatasetAdapter(train, shuffle=False)
    images, start = 0, time.perf_counter()
    for _ in range(EPOCHS):
        adapter.on_epoch_begin()
        for x, _y, _w in adapter.get_numpy_iterator():
            images += len(x)
            if consumer:
                time.sleep(len(x) / consumer)
        adapter.on_epoch_end()
    return images / (time.perf_counter() - start)


def main() -> None:
    cfg = load_config("demo")
    data = preprocess_train(cfg)
    print(f"demo set, targets {cfg.generator.targets}, batch {cfg.generator.batch_size}, "
          f"{EPOCHS} epochs of {STEPS} batches")
    for crop in (128, 256):
        one = images_per_second(cfg, data, crop, 1, False)
        threads = images_per_second(cfg, data, crop, 2, False)
        processes = images_per_second(cfg, data, crop, 2, True)
        print(f"{crop}x{crop}: workers=1 {one:.0f} images/s, workers=2 threads {threads:.0f} images/s, "
              f"workers=2 processes {processes:.0f} images/s")
        report(f"{crop}x{crop} generator workers=2 (threads) vs workers=1", 1 / threads, 1 / one)
        report(f"{crop}x{crop} generator workers=2 (processes) vs workers=1", 1 / processes, 1 / one)
        fed = {name: images_per_second(cfg, data, crop, workers, processes, CONSUMER)
               for name, workers, processes in (("in process", 1, False), ("2 threads", 2, False),
                                                ("2 processes", 2, True))}
        print(f"{crop}x{crop} feeding a {CONSUMER:.0f} images/s consumer: "
              + ", ".join(f"{name} {rate:.0f} images/s ({rate / CONSUMER:.0%} busy)" for name, rate in fed.items()))


if __name__ == "__main__":
    main()
