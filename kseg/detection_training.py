"""Training a box detector (``model: ssd``) with the same run directories, resume and callbacks as
the segmentation models (:mod:`kseg.training` dispatches here for detection models).

Data: a box layout (``voc``, ``coco``, ``box_csv``) is read directly; an instance-mask layout
(the demo, DSB 2018) is preprocessed as usual and its boxes derived from the label images. The
monitor is the validation VOC mAP@0.5 (``val_map50``); the baseline is Otsu + connected-component
boxes on the same validation images.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

import keras

from kseg.config import Config, project_path
from kseg.fileio import atomic_write_text


def box_source(cfg: Config):
    """The training data as a box source and the strata for the folds."""
    from kseg.data.detection_batches import InstanceBoxSource
    from kseg.pipeline import preprocess_train, strata, train_reader

    reader = train_reader(cfg)
    if getattr(reader, "kind", None) == "boxes":
        ids = reader.ids()
        return reader, ids, None
    data = preprocess_train(cfg)
    return InstanceBoxSource(data), list(data.ids), strata(data, project_path(cfg.dataset.root))


def train_detection(cfg: Config, run_dir: Path | None = None, extra_callbacks=()):
    """Fit ``cfg``'s detector; resumes the newest unfinished run of the same config."""
    from kseg.callbacks import EpochSync, InferenceCheckpoint, LearningRateLogger
    from kseg.data.detection_batches import DetectionBatches, detection_augmentation
    from kseg.detection import DetectionScore, TensorBoardBoxes, build_detector, input_size, otsu_boxes, \
        score_detections, truth_entry
    from kseg.distribute import set_determinism, set_mixed_precision, strategy_scope
    from kseg.models import load_model
    from kseg.pipeline import kfold_split
    from kseg.training import (TrainResult, _optimizer, _write_status, find_resumable_run, new_run_dir,
                                schedule_callbacks)

    start = time.perf_counter()
    t, d, g = cfg.train, cfg.detection, cfg.generator
    set_determinism(int(t.seed), bool(t.deterministic))
    policy = set_mixed_precision(bool(t.mixed_precision))

    source, ids, groups = box_source(cfg)
    train_ids, valid_ids = kfold_split(ids, cfg.split.n_folds, cfg.split.fold, cfg.split.seed, groups)

    resumed = run_dir is None and find_resumable_run(cfg)
    run = Path(run_dir or resumed or new_run_dir(cfg))
    run.mkdir(parents=True, exist_ok=True)
    cfg.dump(run / "config.yaml")
    _write_status(run, cfg, "running", started=datetime.now().isoformat(timespec="seconds"))
    print(f"run directory: {run}" + (" (resuming an unfinished run)" if resumed else ""), file=sys.stderr)

    size = input_size(cfg)
    n_classes = len(source.class_names)
    scope, placement, _ = strategy_scope(str(t.strategy))
    with scope:
        _, inference, training, default_boxes = build_detector(cfg, int(cfg.preprocess.channels), n_classes)
        common = dict(input_size=size, default_boxes=default_boxes, iou_threshold=float(d.iou_threshold),
                      seed=int(g.seed))
        train_batches = DetectionBatches(
            source, train_ids, batch_size=int(g.batch_size), shuffle=True,
            augment=detection_augmentation(cfg.augment.pipeline, size, train=True, crop_scale=tuple(d.crop_scale),
                                           min_visibility=float(d.min_visibility), seed=int(g.seed)),
            steps_per_epoch=t.get("steps_per_epoch"), workers=int(g.workers),
            use_multiprocessing=bool(g.use_multiprocessing), max_queue_size=int(g.max_queue_size), **common)
        training.compile(optimizer=_optimizer(cfg, len(train_batches)), jit_compile=bool(t.xla))
    print(f"{placement}; policy {policy}; {inference.count_params():,} parameters; {len(default_boxes)} default "
          f"boxes; {len(train_ids)} train / {len(valid_ids)} validation images", file=sys.stderr)

    valid_samples = [source.load(i) for i in valid_ids]
    valid_images = [s.image if s.image.ndim == 3 else s.image[..., None] for s in valid_samples]
    valid_truths = [truth_entry(s.boxes, s.labels, s.ignore) for s in valid_samples]
    monitor = "val_map50"
    logs_dir = run / "logs"
    callbacks = [
        EpochSync(train_batches),
        DetectionScore(inference, valid_images, valid_truths, every=int(t.score_every)),
        LearningRateLogger(),
        InferenceCheckpoint(inference, run, monitor=monitor, mode="max"),
        keras.callbacks.CSVLogger(str(run / "history.csv"), append=True),
        keras.callbacks.TensorBoard(log_dir=str(logs_dir), write_graph=False),
        TensorBoardBoxes(inference, logs_dir, valid_images, valid_truths, every=int(t.image_every)),
        keras.callbacks.BackupAndRestore(str(run / "backup"), save_freq="epoch", delete_checkpoint=True),
        keras.callbacks.TerminateOnNaN(raise_error=True),
    ]
    callbacks += schedule_callbacks(cfg, monitor) + list(extra_callbacks)
    history = training.fit(train_batches, epochs=int(t.epochs), callbacks=callbacks, verbose=int(t.verbose))

    best = load_model(run / "best.keras") if (run / "best.keras").is_file() else inference
    final = DetectionScore(best, valid_images, valid_truths).evaluate()
    min_size = int(cfg.postprocess.get("min_size", 8))
    baselines = {f"otsu_{k}": v for k, v in score_detections(
        [otsu_boxes(image, min_size) for image in valid_images], valid_truths).items()}
    seconds = time.perf_counter() - start
    summary = {"monitor": monitor, "val_score": final["map50"], "val_coco_map": final["coco_map"],
               "baselines": baselines, "seconds": round(seconds, 1), "train_images": len(train_ids),
               "valid_images": len(valid_ids), "placement": placement}
    atomic_write_text(run / "results.json", json.dumps(summary, indent=1))
    _write_status(run, cfg, "finished", finished=datetime.now().isoformat(timespec="seconds"), **summary)
    return TrainResult(run, history.history, final["map50"], baselines, monitor, seconds)

