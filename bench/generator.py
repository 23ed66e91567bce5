"""Benchmark: augmented training batches per second through Keras' own PyDataset workers and through
kseg's persistent pool (``kseg.data.feeder``, what ``train`` uses), and what a fast accelerator
would get of them.

Run from the repository root: ``python bench/generator.py``. Iterates epochs the way ``model.fit``
does (Keras' ``PyDatasetAdapter``) on the demo set with the demo's augmentation, targets and batch
size, at the demo's 128x128 crops and at 256x256, with ``PAUSE`` seconds between epochs where a
run validates. Keras starts a fresh pool every epoch and stops it at the epoch's end; the
persistent pool lives for the run and builds the next epoch's first batches during the pause.

Each loop feeds a synthetic consumer that trains at ``CONSUMER`` images/s (a GPU's step rate; it
waits without holding the GIL, as a device step does): the images/s it reaches show whether the
input pipeline keeps such an accelerator busy (it would reach ``CONSUMER``). Without a consumer
the loops show the pipeline's own rate.
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
from kseg.data.feeder import PrefetchedBatches
from kseg.data.pipeline import preprocess_train
from kseg.tasks.semantic.batches import make_batches

EPOCHS = 3
STEPS = 40
CONSUMER = 500.0
PAUSE = 0.5
LOOPS = (("in process", 1, False, False), ("keras 2 threads", 2, False, False),
         ("keras 2 processes", 2, True, False), ("persistent 2 threads", 2, False, True),
         ("persistent 2 processes", 2, True, True))


def images_per_second(cfg: Config, data, crop: int, workers: int, processes: bool, persistent: bool = False,
                      consumer: float | None = None) -> float:
    """Images/s of ``EPOCHS`` epochs (pauses included) through Keras' PyDataset iteration; with
    ``consumer``, each batch is then consumed by a step of ``len(batch) / consumer`` seconds."""
    settings = cfg.to_dict()
    settings["generator"] = dict(settings["generator"], workers=workers, use_multiprocessing=processes,
                                 crop_size=[crop, crop])
    settings["train"] = dict(settings["train"], steps_per_epoch=STEPS)
    train, _ = make_batches(Config(settings), data, data.ids, data.ids[:1])
    fed = PrefetchedBatches.of(train) if persistent else None
    adapter = PyDatasetAdapter(fed or train, shuffle=fed is None)
    images, start = 0, time.perf_counter()
    try:
        for epoch in range(EPOCHS):
            train.set_epoch(epoch)
            adapter.on_epoch_begin()
            for x, _y, _w in adapter.get_numpy_iterator():
                images += len(x)
                if consumer:
                    time.sleep(len(x) / consumer)
            adapter.on_epoch_end()
            time.sleep(PAUSE)
    finally:
        if fed is not None:
            fed.close()
    return images / (time.perf_counter() - start - EPOCHS * PAUSE)


def main() -> None:
    cfg = load_config("demo")
    data = preprocess_train(cfg)
    print(f"demo set, targets {cfg.generator.targets}, batch {cfg.generator.batch_size}, "
          f"{EPOCHS} epochs of {STEPS} batches, {PAUSE} s validation pause after each (not counted)")
    for crop in (128, 256):
        for consumer in (None, CONSUMER):
            rates = {name: images_per_second(cfg, data, crop, workers, processes, persistent, consumer)
                     for name, workers, processes, persistent in LOOPS}
            what = f"feeding a {CONSUMER:.0f} images/s consumer" if consumer else "pipeline alone"
            print(f"{crop}x{crop} {what}: " + ", ".join(
                f"{name} {rate:.0f} images/s" + (f" ({rate / CONSUMER:.0%} busy)" if consumer else "")
                for name, rate in rates.items()))
            for kind in ("threads", "processes"):
                report(f"{crop}x{crop} {what}: persistent 2 {kind} vs keras 2 {kind}",
                       1 / rates[f"persistent 2 {kind}"], 1 / rates[f"keras 2 {kind}"])
            report(f"{crop}x{crop} {what}: persistent 2 threads vs in process",
                   1 / rates["persistent 2 threads"], 1 / rates["in process"])


if __name__ == "__main__":
    main()
