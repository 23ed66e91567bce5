"""Training: run directory, model + in-graph loss, callbacks, resume, and the final report.

``train(cfg)`` preprocesses (or reads the cache), splits folds, builds the inference model and the
training graph from one builder call, and fits with:
validation IoU-mAP -> checkpoints of the inference model (best on the monitor, last every epoch)
-> CSV log -> TensorBoard scalars and pictures -> BackupAndRestore -> TerminateOnNaN -> learning
-rate schedule -> EarlyStopping.

Run directories are ``runs/<dataset>-<model>-<time>/``. A run that did not finish is resumed by
the next ``train`` with the same config (BackupAndRestore restores weights, optimizer and epoch;
the interrupted epoch is replayed from its first batch).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import keras
import numpy as np

from kseg.config import Config, project_path
from kseg.errors import ConfigError
from kseg.fileio import atomic_write_text

STATUS = "status.json"


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    history: dict
    val_score: float
    baselines: dict
    monitor: str
    seconds: float


# -- run directories --------------------------------------------------------------------------------
def _run_prefix(cfg: Config) -> str:
    return f"{cfg.dataset.name}-{cfg.model.name}"


def _training_fingerprint(cfg: Config) -> str:
    """What must match for an unfinished run to be resumed (not where the logs go)."""
    return cfg.fingerprint("dataset", "preprocess", "augment", "generator", "split", "model", "train", "postprocess",
                          "detection")


def find_resumable_run(cfg: Config) -> Path | None:
    runs = project_path(cfg.train.runs_dir)
    if not runs.is_dir():
        return None
    fingerprint = _training_fingerprint(cfg)
    for run in sorted(runs.glob(f"{_run_prefix(cfg)}-*"), reverse=True):
        status_file = run / STATUS
        if not status_file.is_file():
            continue
        status = json.loads(status_file.read_text())
        if status.get("state") == "running" and status.get("fingerprint") == fingerprint:
            return run
    return None


def new_run_dir(cfg: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run = project_path(cfg.train.runs_dir) / f"{_run_prefix(cfg)}-{stamp}"
    suffix = 1
    while run.exists():
        run = run.with_name(f"{_run_prefix(cfg)}-{stamp}-{suffix}")
        suffix += 1
    run.mkdir(parents=True)
    return run


def _write_status(run: Path, cfg: Config, state: str, **extra) -> None:
    status = {"state": state, "fingerprint": _training_fingerprint(cfg), **extra}
    atomic_write_text(run / STATUS, json.dumps(status, indent=1))


def newest_run(runs_dir: str | Path = "runs", finished_only: bool = True) -> Path | None:
    """The newest run directory (by its time stamp), optionally only finished ones."""
    runs = project_path(runs_dir)
    candidates = sorted((p for p in runs.glob("*/" + STATUS)), key=lambda p: p.stat().st_mtime, reverse=True)
    for status_file in candidates:
        if not finished_only or json.loads(status_file.read_text()).get("state") == "finished":
            return status_file.parent
    return None


# -- scoring -----------------------------------------------------------------------------------------
def make_scorer(cfg: Config, is_instance: bool):
    """``score(truth, probabilities) -> float`` and its name, for the validation callback."""
    from kseg import metrics
    from kseg.postprocess import instances_from_probabilities

    post = dict(cfg.postprocess)
    if is_instance:
        def score(truth, probabilities):
            return metrics.iou_map(truth, instances_from_probabilities(probabilities, **post))
        return score, "iou_map"

    target_class = int(cfg.train.get("score_class", 1))
    threshold = float(post.get("threshold", 0.5))

    def class_iou(truth, probabilities):
        predicted = probabilities[..., 0] > threshold
        if target_class == 0:  # e.g. membranes: the complement of the foreground channel
            return metrics.iou(truth == 0, ~predicted)
        return metrics.iou(truth == target_class, predicted)
    return class_iou, f"class{target_class}_iou"


def baseline_scores(cfg: Config, data, ids) -> dict[str, float]:
    """Classical baselines on ``ids``: Otsu + connected components (instance data) or Otsu as the
    mask (semantic data, plus the trivial prediction "every pixel is foreground")."""
    from kseg import metrics
    from kseg.postprocess import otsu_baseline

    target_class = int(cfg.train.get("score_class", 1))

    def semantic(truth, predicted):
        if target_class == 0:
            return metrics.iou(truth == 0, ~predicted)
        return metrics.iou(truth == target_class, predicted)

    otsu, trivial = [], []
    for sample_id in ids:
        arrays = data.load(sample_id)
        labels = otsu_baseline(arrays["image"], min_size=int(cfg.postprocess.get("min_size", 8)))
        truth = arrays["target"]
        if data.kind == "instance":
            otsu.append(metrics.iou_map(truth, labels))
        else:
            otsu.append(semantic(truth, labels > 0))
            trivial.append(semantic(truth, np.ones(truth.shape, bool)))
    scores = {"otsu": float(np.mean(otsu))}
    if trivial:
        scores["all_foreground"] = float(np.mean(trivial))
    return scores


# -- model ---------------------------------------------------------------------------------------------
def build_models(cfg: Config, channels: int):
    """(inference model, training model) from one builder call."""
    from kseg.models import build_model
    from kseg.models.training_graph import build_training_model

    args = dict(cfg.model.args or {})
    targets = cfg.generator.targets
    if targets == "classes":
        if int(args.get("n_classes", 0)) < 2 or cfg.train.loss != "ce":
            raise ConfigError("generator.targets 'classes' needs model.args.n_classes >= 2 (background "
                              "included) and a softmax loss (train.loss: ce)")
    else:
        args.pop("n_classes", None)
        args["targets"] = targets
    inference = build_model(cfg.model.name, input_shape=(None, None, channels), **args)
    training = build_training_model(inference, loss=cfg.train.loss, loss_kwargs=dict(cfg.train.loss_args or {}))
    return inference, training


def pad_multiple(cfg: Config) -> int:
    """Validation images are padded to a multiple of the model's total stride."""
    from kseg.models import input_divisor

    return int(input_divisor(cfg.model.name, **dict(cfg.model.args or {})))


def _optimizer(cfg: Config, steps_per_epoch: int):
    t = cfg.train
    rate = float(t.learning_rate)
    if t.schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(rate, decay_steps=max(1, t.epochs * steps_per_epoch),
                                                      alpha=0.05)
    return keras.optimizers.Adam(learning_rate=rate)


def schedule_callbacks(cfg: Config, monitor: str) -> list[keras.callbacks.Callback]:
    """Learning-rate plateau and early stopping on the (maximised) validation monitor, as configured."""
    t = cfg.train
    callbacks = []
    if t.schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode="max", factor=0.5,
                                                           patience=int(t.plateau_patience), min_lr=1e-5))
    if t.early_stopping:
        callbacks.append(keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=int(t.early_stopping)))
    return callbacks


# -- train ---------------------------------------------------------------------------------------------
def train(cfg: Config, run_dir: Path | None = None,
          extra_callbacks: list[keras.callbacks.Callback] | tuple = ()) -> TrainResult:
    """Fit ``cfg``'s model; resumes the newest unfinished run of the same config unless ``run_dir``
    is given. ``extra_callbacks`` run after the built-in ones."""
    from kseg.callbacks import (EpochSync, InferenceCheckpoint, LearningRateLogger, TensorBoardImages,
                                ValidationScore)
    from kseg.distribute import set_determinism, set_mixed_precision, strategy_scope
    from kseg.pipeline import kfold_split, make_batches, preprocess_train, strata
    from kseg.tf_data import variable_size_input

    from kseg.models import get_model_entry

    if get_model_entry(cfg.model.name).task in ("detection", "instance"):
        from kseg.detection_training import train_detection

        return train_detection(cfg, run_dir, extra_callbacks)
    start = time.perf_counter()
    t = cfg.train
    set_determinism(int(t.seed), bool(t.deterministic))
    policy = set_mixed_precision(bool(t.mixed_precision))

    data = preprocess_train(cfg)
    groups = strata(data, project_path(cfg.dataset.root))
    train_ids, valid_ids = kfold_split(data.ids, cfg.split.n_folds, cfg.split.fold, cfg.split.seed, groups)

    resumed = run_dir is None and find_resumable_run(cfg)
    run = run_dir or resumed or new_run_dir(cfg)
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    cfg.dump(run / "config.yaml")
    _write_status(run, cfg, "running", started=datetime.now().isoformat(timespec="seconds"))
    print(f"run directory: {run}" + (" (resuming an unfinished run)" if resumed else ""), file=sys.stderr)

    channels = int(cfg.preprocess.channels)
    scope, placement, replicas = strategy_scope(str(t.strategy))
    with scope:
        inference, training = build_models(cfg, channels)
        divisor = pad_multiple(cfg)
        train_batches, valid_batches = make_batches(cfg, data, train_ids, valid_ids, pad_multiple=divisor,
                                                    output="graph")
        steps = len(train_batches)
        training.compile(optimizer=_optimizer(cfg, steps), jit_compile=bool(t.xla))
    print(f"{placement}; policy {policy}; {inference.count_params():,} parameters; "
          f"{len(train_ids)} train / {len(valid_ids)} validation images", file=sys.stderr)

    valid_arrays = [data.load(i) for i in valid_ids]
    valid_images = [a["image"].astype(np.float32) / 255 for a in valid_arrays]
    valid_truths = [a["target"] for a in valid_arrays]
    score, score_name = make_scorer(cfg, data.kind == "instance")
    monitor = f"val_{score_name}"
    logs_dir = run / "logs"
    callbacks = [
        EpochSync(train_batches),
        ValidationScore(inference, valid_images, valid_truths, score, name=score_name, pad_multiple=divisor,
                        every=int(t.score_every)),
        LearningRateLogger(),
        InferenceCheckpoint(inference, run, monitor=monitor, mode="max"),
        keras.callbacks.CSVLogger(str(run / "history.csv"), append=True),
        keras.callbacks.TensorBoard(log_dir=str(logs_dir), write_graph=False),
        TensorBoardImages(inference, logs_dir, valid_images,
                          [np.asarray(v) for v in valid_truths],
                          [a.get("weight", np.ones(a["target"].shape, np.float32)) for a in valid_arrays],
                          pad_multiple=divisor, every=int(t.image_every)),
        keras.callbacks.BackupAndRestore(str(run / "backup"), save_freq="epoch", delete_checkpoint=True),
        keras.callbacks.TerminateOnNaN(raise_error=True),
    ]
    callbacks += schedule_callbacks(cfg, monitor) + list(extra_callbacks)

    # Whole-image validation batches hold one image, which several replicas cannot split (Keras then
    # fails reducing the replicas' outputs): with more than one replica val_loss is left out and the
    # callback's val score, computed image by image, is the only validation figure.
    validation = variable_size_input(valid_batches) if replicas == 1 else None
    if replicas > 1:
        print(f"{replicas} replicas: no val_loss (whole-image validation batches hold one image); {monitor} "
              "is computed as usual", file=sys.stderr)
    history = training.fit(train_batches, validation_data=validation, epochs=int(t.epochs), callbacks=callbacks,
                           verbose=int(t.verbose))

    from kseg.models import load_model

    best = load_model(run / "best.keras") if (run / "best.keras").is_file() else inference
    final = ValidationScore(best, valid_images, valid_truths, score, name=score_name, pad_multiple=divisor).evaluate()
    baselines = baseline_scores(cfg, data, valid_ids)
    seconds = time.perf_counter() - start
    summary = {"monitor": monitor, "val_score": final, "baselines": baselines, "seconds": round(seconds, 1),
               "train_images": len(train_ids), "valid_images": len(valid_ids), "placement": placement}
    atomic_write_text(run / "results.json", json.dumps(summary, indent=1))
    _write_status(run, cfg, "finished", finished=datetime.now().isoformat(timespec="seconds"), **summary)
    return TrainResult(run, history.history, final, baselines, monitor, seconds)
