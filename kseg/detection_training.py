"""Training detectors -- SSD boxes (``model: ssd``) and Mask R-CNN instances (``model: maskrcnn``) --
with the same run directories, resume and callbacks as the segmentation models
(:mod:`kseg.training` dispatches here by the model's task).

Each detector is a small *task* object saying how to read its data, build its models and batches,
score the validation split and compute the classical baseline; :func:`_fit` runs the shared loop.

* SSD: a box layout (``voc``, ``coco``, ``box_csv``) is read directly; an instance-mask layout (the
  demo, DSB 2018) is preprocessed as usual and its boxes derived from the label images. Monitor:
  validation VOC mAP@0.5 (``val_map50``); baseline: Otsu + connected-component boxes.
* Mask R-CNN: instance-mask layouts. Monitor: validation IoU-mAP (``val_iou_map``, the DSB metric,
  from label images pasted at each image's own size); baseline: Otsu + connected components.
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
        return reader, reader.ids(), None
    data = preprocess_train(cfg)
    return InstanceBoxSource(data), list(data.ids), strata(data, project_path(cfg.dataset.root))


def _batch_options(cfg: Config) -> dict:
    g = cfg.generator
    return dict(seed=int(g.seed), steps_per_epoch=cfg.train.get("steps_per_epoch"), workers=int(g.workers),
                use_multiprocessing=bool(g.use_multiprocessing), max_queue_size=int(g.max_queue_size))


class SsdTask:
    """SSD on boxes (see the module notes)."""

    monitor = "val_map50"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.source, self.ids, self.groups = box_source(cfg)

    def build(self, train_ids):
        from kseg.data.detection_batches import DetectionBatches, detection_augmentation
        from kseg.detection import build_detector, input_size

        cfg, d = self.cfg, self.cfg.detection
        size = input_size(cfg)
        _, inference, training, default_boxes = build_detector(cfg, int(cfg.preprocess.channels),
                                                               len(self.source.class_names))
        batches = DetectionBatches(
            self.source, train_ids, input_size=size, default_boxes=default_boxes,
            iou_threshold=float(d.iou_threshold), batch_size=int(cfg.generator.batch_size), shuffle=True,
            augment=detection_augmentation(cfg.augment.pipeline, size, train=True, crop_scale=tuple(d.crop_scale),
                                           min_visibility=float(d.min_visibility), seed=int(cfg.generator.seed)),
            **_batch_options(cfg))
        return inference, training, batches, f"{len(default_boxes)} default boxes"

    def validation(self, valid_ids) -> None:
        from kseg.detection import truth_entry

        samples = [self.source.load(i) for i in valid_ids]
        self.images = [s.image if s.image.ndim == 3 else s.image[..., None] for s in samples]
        self.truths = [truth_entry(s.boxes, s.labels, s.ignore) for s in samples]

    def callbacks(self, inference, logs_dir: Path) -> list:
        from kseg.detection import DetectionScore, TensorBoardBoxes

        t = self.cfg.train
        return [DetectionScore(inference, self.images, self.truths, every=int(t.score_every)),
                TensorBoardBoxes(inference, logs_dir, self.images, self.truths, every=int(t.image_every))]

    def final(self, model) -> dict:
        from kseg.detection import DetectionScore

        scores = DetectionScore(model, self.images, self.truths).evaluate()
        return {"val_score": scores["map50"], "val_coco_map": scores["coco_map"]}

    def baselines(self, valid_ids) -> dict:
        from kseg.detection import otsu_boxes, score_detections

        min_size = int(self.cfg.postprocess.get("min_size", 8))
        return {f"otsu_{k}": v for k, v in score_detections(
            [otsu_boxes(image, min_size) for image in self.images], self.truths).items()}


class MaskRCNNTask:
    """Mask R-CNN on instance masks (see the module notes)."""

    monitor = "val_iou_map"

    def __init__(self, cfg: Config):
        from kseg.errors import ConfigError
        from kseg.pipeline import preprocess_train, strata

        self.cfg = cfg
        self.data = preprocess_train(cfg)
        if self.data.kind != "instance":
            raise ConfigError("Mask R-CNN trains on instance masks; this dataset has semantic masks")
        self.ids = list(self.data.ids)
        self.groups = strata(self.data, project_path(cfg.dataset.root))

    def build(self, train_ids):
        from kseg.data.maskrcnn_batches import MaskRCNNBatches, instance_augmentation
        from kseg.detection import build_instance_detector, input_size

        cfg, d = self.cfg, self.cfg.detection
        size = input_size(cfg)
        inference, training, anchors = build_instance_detector(cfg, int(cfg.preprocess.channels))
        batches = MaskRCNNBatches(
            self.data, train_ids, input_size=size, anchors=anchors, batch_size=int(cfg.generator.batch_size),
            shuffle=True, max_instances=int(d.max_instances),
            augment=instance_augmentation(cfg.augment.pipeline, size, train=True, crop_scale=tuple(d.crop_scale),
                                          seed=int(cfg.generator.seed)),
            **_batch_options(cfg))
        return inference, training, batches, f"{len(anchors)} anchors"

    def validation(self, valid_ids) -> None:
        arrays = [self.data.load(i) for i in valid_ids]
        self.images = [a["image"] for a in arrays]
        self.truths = [a["target"] for a in arrays]

    def callbacks(self, inference, logs_dir: Path) -> list:
        from kseg.detection import InstanceScore, TensorBoardInstances

        t, d = self.cfg.train, self.cfg.detection
        return [InstanceScore(inference, self.images, self.truths, mask_threshold=float(d.mask_threshold),
                              min_size=int(self.cfg.postprocess.get("min_size", 8)), every=int(t.score_every)),
                TensorBoardInstances(inference, logs_dir, self.images, self.truths,
                                     mask_threshold=float(d.mask_threshold), every=int(t.image_every))]

    def final(self, model) -> dict:
        from kseg.detection import InstanceScore

        return {"val_score": InstanceScore(model, self.images, self.truths,
                                           mask_threshold=float(self.cfg.detection.mask_threshold),
                                           min_size=int(self.cfg.postprocess.get("min_size", 8))).evaluate()}

    def baselines(self, valid_ids) -> dict:
        from kseg.training import baseline_scores

        return baseline_scores(self.cfg, self.data, valid_ids)


def train_detection(cfg: Config, run_dir: Path | None = None, extra_callbacks=()):
    """Fit ``cfg``'s detector; resumes the newest unfinished run of the same config."""
    from kseg.models import get_model_entry

    task = MaskRCNNTask(cfg) if get_model_entry(cfg.model.name).task == "instance" else SsdTask(cfg)
    return _fit(cfg, task, run_dir, extra_callbacks)


def _fit(cfg: Config, task, run_dir: Path | None, extra_callbacks):
    from kseg.callbacks import EpochSync, InferenceCheckpoint, LearningRateLogger
    from kseg.distribute import set_determinism, set_mixed_precision, strategy_scope
    from kseg.models import load_model
    from kseg.pipeline import kfold_split
    from kseg.training import (TrainResult, _optimizer, _write_status, find_resumable_run, new_run_dir,
                                schedule_callbacks)

    start = time.perf_counter()
    t = cfg.train
    set_determinism(int(t.seed), bool(t.deterministic))
    policy = set_mixed_precision(bool(t.mixed_precision))
    train_ids, valid_ids = kfold_split(task.ids, cfg.split.n_folds, cfg.split.fold, cfg.split.seed, task.groups)

    resumed = run_dir is None and find_resumable_run(cfg)
    run = Path(run_dir or resumed or new_run_dir(cfg))
    run.mkdir(parents=True, exist_ok=True)
    cfg.dump(run / "config.yaml")
    _write_status(run, cfg, "running", started=datetime.now().isoformat(timespec="seconds"))
    print(f"run directory: {run}" + (" (resuming an unfinished run)" if resumed else ""), file=sys.stderr)

    scope, placement, _ = strategy_scope(str(t.strategy))
    with scope:
        inference, training, batches, what = task.build(train_ids)
        training.compile(optimizer=_optimizer(cfg, len(batches)), jit_compile=bool(t.xla))
    print(f"{placement}; policy {policy}; {inference.count_params():,} parameters; {what}; "
          f"{len(train_ids)} train / {len(valid_ids)} validation images", file=sys.stderr)

    task.validation(valid_ids)
    monitor = task.monitor
    logs_dir = run / "logs"
    score, pictures = task.callbacks(inference, logs_dir)
    callbacks = [
        EpochSync(batches), score, LearningRateLogger(),
        InferenceCheckpoint(inference, run, monitor=monitor, mode="max"),
        keras.callbacks.CSVLogger(str(run / "history.csv"), append=True),
        keras.callbacks.TensorBoard(log_dir=str(logs_dir), write_graph=False),
        pictures,
        keras.callbacks.BackupAndRestore(str(run / "backup"), save_freq="epoch", delete_checkpoint=True),
        keras.callbacks.TerminateOnNaN(raise_error=True),
    ]
    callbacks += schedule_callbacks(cfg, monitor) + list(extra_callbacks)
    history = training.fit(batches, epochs=int(t.epochs), callbacks=callbacks, verbose=int(t.verbose))

    best = load_model(run / "best.keras") if (run / "best.keras").is_file() else inference
    final = task.final(best)
    baselines = task.baselines(valid_ids)
    seconds = time.perf_counter() - start
    summary = {"monitor": monitor, **final, "baselines": baselines, "seconds": round(seconds, 1),
               "train_images": len(train_ids), "valid_images": len(valid_ids), "placement": placement}
    atomic_write_text(run / "results.json", json.dumps(summary, indent=1, default=float))
    _write_status(run, cfg, "finished", finished=datetime.now().isoformat(timespec="seconds"), **summary)
    return TrainResult(run, history.history, float(final["val_score"]), baselines, monitor, seconds)


__all__ = ["MaskRCNNTask", "SsdTask", "box_source", "train_detection"]
