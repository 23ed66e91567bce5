"""Record reference results of tiny deterministic training runs, one per model family.

Usage: python tests/golden/record.py OUT_DIR

The files beside this script were recorded with the code as it was before the task redesign
(commit 900e6a3, where the same script imported ``kseg.training``, ``kseg.submit`` and
``kseg.models``); ``tests/engine/test_golden.py`` checks that the current code reproduces them bit
for bit. Every family is bit-exact run to run on CPU (two recordings in separate processes gave
identical weights, scores, predictions and CSVs).

For each family (unet, fcn, ssd, maskrcnn) this trains a tiny 2-epoch deterministic run on a
synthetic demo competition and writes:

    OUT_DIR/golden.json               overrides, model name, val_score, history and sha256 checksums
                                      of the best / last checkpoint weights, per family
    OUT_DIR/<family>/config.yaml      the run's resolved config (holds temporary paths)
    OUT_DIR/<family>/best.keras       checkpoints
    OUT_DIR/<family>/last.keras
    OUT_DIR/<family>/status.json
    OUT_DIR/<family>/results.json
    OUT_DIR/<family>/history.csv
    OUT_DIR/<family>/prediction.npz   best.keras on a fixed random input (one array per output key)
    OUT_DIR/<family>/submission.csv   make_submission from the copied run directory

The fixed prediction input is ``np.random.default_rng(0).random((1, H, W, 3), dtype=np.float32)``
with H = W = 32 for the segmentation models and 64 for the detectors.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root, for ``import kseg``
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

# Settings whose default changed after the recording, at the value the recorded code used (the
# old default): they join every family's overrides, and overrides_template stays as recorded.
PINNED_OVERRIDES = ("train.mixed_precision=off", "augment.seeding=shared")
RUN_FILES = ("config.yaml", "best.keras", "last.keras", "status.json", "results.json", "history.csv")
MAX_CHECKPOINT_BYTES = 1_000_000

# Small builder options (as in tests/test_models.py and tests/test_maskrcnn_training.py).
TINY_FCN = {"width": 2, "convs_per_block": "[1,1,1,1,1]", "fc_width": 8, "fc_kernel": 3}
TINY_MASKRCNN = {"backbone": "small", "width": 4, "fpn_channels": 8, "fc_channels": 16, "mask_channels": 8,
                 "mask_convs": 1, "rpn_pre_nms": 200, "rpn_post_nms": 50, "max_detections": 20}

SEGMENTATION_INPUT = 32
DETECTION_INPUT = 64


def family_settings(tmp: Path) -> dict[str, tuple[str | None, list[str]]]:
    """family -> (model name for load_config, overrides)."""
    common = ["train.deterministic=true", "train.epochs=2", "train.steps_per_epoch=2", "train.verbose=0",
              "preprocess.n_jobs=1", "preprocess.progress=false", "dataset.demo=false", "split.n_folds=5",
              f"preprocess.cache_dir={tmp / 'cache'}", f"train.runs_dir={tmp / 'runs'}",
              f"submission.dir={tmp / 'submissions'}"]
    # Connected components: the segmentation runs' scores and CSVs do not depend on the watershed
    # variants, which the post-processing tests cover.
    segmentation = ["generator.batch_size=2", "generator.crop_size=[32,32]", "train.image_every=1",
                    "postprocess.method=components"]
    return {
        "unet": (None, [*common, *segmentation, "model.args.depth=2", "model.args.base_filters=4"]),
        "fcn": ("fcn", [*common, *segmentation, *(f"model.args.{k}={v}" for k, v in TINY_FCN.items())]),
        "ssd": ("ssd", [*common, "generator.batch_size=2", "detection.input_size=[64,64]", "model.args.width=4",
                        "train.image_every=1"]),
        "maskrcnn": ("maskrcnn", [*common, *(f"model.args.{k}={v}" for k, v in TINY_MASKRCNN.items()),
                                  "generator.batch_size=2", "detection.input_size=[64,64]",
                                  "detection.rois_per_image=16", "train.image_every=1"]),
    }


def weights_sha256(path: Path) -> str:
    from kseg.tasks.base import load_model

    weights = load_model(path).get_weights()
    return hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in weights)).hexdigest()


def history_rows(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def prediction(path: Path, detector: bool) -> dict[str, np.ndarray]:
    import keras

    from kseg.tasks.base import load_model

    model = load_model(path)
    size = DETECTION_INPUT if detector else SEGMENTATION_INPUT
    x = np.random.default_rng(0).random((1, size, size, 3), dtype=np.float32)
    if detector:
        out = model.predict_on_batch(x)
        return {key: np.asarray(value) for key, value in out.items()}
    out = model(x, training=False)
    if isinstance(out, dict):
        return {key: keras.ops.convert_to_numpy(value) for key, value in out.items()}
    return {"output": keras.ops.convert_to_numpy(out)}


def record(out: Path, portable: tuple[str, ...] = ()) -> dict:
    """Train and record every family; those in ``portable`` run on the ``keras.ops`` kernel twins
    (``kseg.nn.kernels.portable_kernels``), the computation of the code the files came from."""
    import contextlib

    from kseg.core.config import load_config
    from kseg.engine.fit import train
    from kseg.io.demo import write_demo_dataset
    from kseg.nn.kernels import portable_kernels
    from kseg.submission.make import make_submission
    from kseg.tasks.base import task_class

    out.mkdir(parents=True, exist_ok=True)
    golden: dict = {"prediction_input": "np.random.default_rng(0).random((1, S, S, 3), dtype=np.float32), "
                                        f"S={SEGMENTATION_INPUT} (segmentation) / {DETECTION_INPUT} (detection)",
                    "demo_dataset": {"seed": 3, "n_train": 10, "n_test": 2},
                    "families": {}}
    with tempfile.TemporaryDirectory(prefix="kseg-golden-") as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "demo"
        write_demo_dataset(root, seed=3, n_train=10, n_test=2)
        for family, (model, overrides) in family_settings(tmp).items():
            started = time.perf_counter()
            cfg = load_config("demo", model=model, data_root=str(root), overrides=[*overrides, *PINNED_OVERRIDES])
            with portable_kernels() if family in portable else contextlib.nullcontext():
                result = train(cfg)
            run = Path(result.run_dir)

            target = out / family
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            for name in RUN_FILES:
                shutil.copy2(run / name, target / name)
            for name in ("best.keras", "last.keras"):
                size = (target / name).stat().st_size
                if size > MAX_CHECKPOINT_BYTES:
                    raise SystemExit(f"{family}/{name} is {size} bytes; shrink the tiny config")

            detector = task_class(cfg.model.name).kind != "semantic"
            np.savez(target / "prediction.npz", **prediction(target / "best.keras", detector))

            submission = make_submission([target], overrides=[f"dataset.root={root}"], out_dir=tmp / "subs",
                                         progress=False)
            shutil.copy2(submission.csv, target / "submission.csv")

            golden["families"][family] = {
                "family": family,
                "model_arg": model,
                "overrides": list(overrides),
                "overrides_template": [o.replace(str(tmp), "<tmp>") for o in overrides],
                "model": cfg.model.name,
                "val_score": float(result.val_score),
                "monitor": result.monitor,
                "history": history_rows(run / "history.csv"),
                "best_sha256": weights_sha256(run / "best.keras"),
                "last_sha256": weights_sha256(run / "last.keras"),
                "seconds": round(time.perf_counter() - started, 1),
            }
            print(f"{family}: val_score={result.val_score:.6f} "
                  f"({golden['families'][family]['seconds']} s)", flush=True)
    (out / "golden.json").write_text(json.dumps(golden, indent=2) + "\n")
    return golden


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    record(args.out_dir.resolve())
    print(f"total {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
