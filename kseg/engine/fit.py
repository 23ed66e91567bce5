"""The one fit loop, over any task: run directory, resume, status, distribution, callbacks and
the final report.

``train(cfg)`` asks ``cfg.model.name``'s task (:mod:`kseg.tasks.base`) for its data, models and
batches and fits with:
validation score (the task's predictions scored by its evaluator) -> learning rate in the logs ->
checkpoints of the inference model (best on the monitor, last every epoch) -> CSV log ->
TensorBoard scalars -> the task's TensorBoard pictures -> epoch snapshots -> TerminateOnNaN ->
learning-rate schedule -> EarlyStopping.

Run directories are ``runs/<dataset>-<model>-<time>/`` (:mod:`kseg.core.runs`). A run that did
not finish is resumed by the next ``train`` with the same config (:mod:`kseg.engine.snapshots`
restores weights, optimizer, epoch, CSV log and checkpoint state as one unit; the interrupted epoch
is replayed from its first batch).

A pretrained encoder can be frozen for the first epochs, train at a smaller learning rate and keep
its BatchNorm statistics (:mod:`kseg.engine.freezing`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

import keras
import numpy as np

from kseg.core import runs
from kseg.core.config import Config
from kseg.core.errors import ConfigError
from kseg.core.fileio import atomic_path, atomic_write_text
from kseg.core.log import get_logger
from kseg.core.pictures import unit_to_uint8
from kseg.data.feeder import PrefetchedBatches
from kseg.data.split import fold_clusters, split_ids
from kseg.engine import freezing, snapshots
from kseg.engine.averaging import (
    AVERAGED,
    CycleSnapshots,
    EpochWeights,
    average_weights,
    chosen_epochs,
    ema_callbacks,
    epoch_file,
    read_scores,
    recompute_batchnorm,
)
from kseg.engine.callbacks import (
    BaselineScores,
    EpochSync,
    InferenceCheckpoint,
    LearningRateLogger,
)
from kseg.engine.distribute import (
    initialize_processes,
    is_chief,
    set_determinism,
    share_chief_file,
    strategy_scope,
)
from kseg.engine.precision import mixed_precision
from kseg.engine.snapshots import EpochSnapshots
from kseg.engine.tf_data import variable_size_input
from kseg.io.modality import GROUPS, decoded_group
from kseg.metrics.evaluators import evaluate
from kseg.nn.callbacks import ValidationScore
from kseg.tasks.base import Task, get_task, load_model

log = get_logger("engine")


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    history: dict
    val_score: float
    baselines: dict
    monitor: str
    seconds: float
    warnings: list[str] = dataclasses.field(default_factory=list)


def cycle_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Steps per cosine-restart cycle (``train.cycle_epochs`` epochs); a clear error when unset."""
    cycle = int(cfg.train.get("cycle_epochs", 0) or 0)
    if cycle < 1:
        raise ConfigError("train.schedule=cosine_restarts needs train.cycle_epochs (epochs per cycle), e.g. 10")
    return cycle * steps_per_epoch


def optimizer(cfg: Config, steps_per_epoch: int, encoder: keras.Model | None = None):
    """Adam with the configured schedule and EMA; with ``encoder`` (:func:`kseg.engine.freezing.prepare`)
    the encoder's learning rate follows ``train.freeze_encoder_epochs`` and ``train.encoder_lr``."""
    t = cfg.train
    rate = float(t.learning_rate)
    if t.schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(rate, decay_steps=max(1, t.epochs * steps_per_epoch),
                                                      alpha=0.05)
    elif t.schedule == "cosine_restarts":
        rate = keras.optimizers.schedules.CosineDecayRestarts(rate, first_decay_steps=cycle_steps(cfg, steps_per_epoch),
                                                              t_mul=1.0, m_mul=1.0, alpha=0.05)
    ema = float(t.get("ema", 0) or 0)
    # The average is swapped in for validation and checkpoints: kseg.engine.averaging
    averaging = {"use_ema": True, "ema_momentum": ema} if ema else {}
    return freezing.adam(cfg, steps_per_epoch, encoder, learning_rate=rate, **averaging)


def write_averaged(task: Task, built, inference: keras.Model, run: Path, k: int, average_from: str, images,
                   truths) -> dict:
    """Average the chosen epochs' weights into ``inference``, recompute BatchNorm's statistics on
    training batches, save ``averaged.keras`` and score it on the validation images
    (``kseg.engine.averaging``)."""
    epochs = [e for e in chosen_epochs(read_scores(run), k, average_from) if epoch_file(run, e).is_file()]
    if not epochs:
        return {}
    average_weights(inference, [epoch_file(run, e) for e in epochs])
    built.batches.set_epoch(0)  # the first epoch's batches: the same whichever epoch training ended at
    batches = recompute_batchnorm(inference, built.batches)
    with atomic_path(run / AVERAGED, suffix=".tmp.keras") as tmp:
        inference.save(tmp)
    scores = score_predictions(task, task.predict_many(inference, images), truths)
    score = scores[next(iter(scores))]
    log.info(f"averaged epochs {epochs} ({average_from} {k}; BatchNorm statistics from {batches} training "
             f"batches): {next(iter(scores))} {score:.4f} -> {run / AVERAGED}")
    return {"epochs": epochs, "from": average_from, "batchnorm_batches": batches, "score": float(score)}


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


def score_predictions(task: Task, predictions, truths, prefix: str = "") -> dict[str, float]:
    """The task's evaluator over one set of predictions; names prefixed when there are several."""
    scores = evaluate(task.evaluator(), truths, predictions)
    if len(scores) == 1 and prefix:
        return {prefix: next(iter(scores.values()))}
    return {f"{prefix}_{name}" if prefix else name: value for name, value in scores.items()}


def image_groups(images, notes=None) -> list[str]:
    """Each validation image's group (``kseg.io.modality.decoded_group``): from the image as the
    model sees it (floats in [0, 1] read as 0..255), or, where ``preprocess.modality`` converted it,
    from the reader's note (one ``notes`` mapping per image) of what it was."""
    notes = notes if notes is not None else [{}] * len(images)
    return [decoded_group(image if np.asarray(image).dtype == np.uint8 else unit_to_uint8(image), note)
            for image, note in zip(images, notes)]


def score_groups(task: Task, predictions, truths, groups: list[str]) -> dict[str, float]:
    """The evaluator's scores per image group (``<name>_<group>``) when the images hold more than one
    group: a model can gain on fluorescence while it loses on stained tissue."""
    if len(set(groups)) < 2:
        return {}
    scores = {}
    for group in GROUPS:
        chosen = [i for i, g in enumerate(groups) if g == group]
        if chosen:
            found = score_predictions(task, [predictions[i] for i in chosen], [truths[i] for i in chosen])
            scores.update({f"{name}_{group}": value for name, value in found.items()})
    return scores


def stuck_at_baseline(history_csv: Path, monitor: str, baselines: dict[str, float],
                      tolerance: float = 1e-9) -> list[str]:
    """What a run whose validation score never moved should say: the monitor took one value over
    every epoch, or every epoch's value is a trivial baseline's (the model predicts what an empty or
    an all-foreground prediction gives)."""
    if not history_csv.is_file():
        return []
    with open(history_csv, newline="") as f:
        values = [float(row[monitor]) for row in csv.DictReader(f) if row.get(monitor) not in (None, "")]
    if len(values) < 2:
        return []
    for name in ("empty", "all_foreground"):
        if name in baselines and all(abs(v - baselines[name]) <= tolerance for v in values):
            return [f"{monitor} stayed at the {name.replace('_', '-')} baseline's {baselines[name]:.4f} for all "
                    f"{len(values)} epochs: the model predicts what a trivial prediction would"]
    if max(values) - min(values) <= tolerance:
        return [f"{monitor} never moved from {values[0]:.4f} in {len(values)} epochs"]
    return []


def _mark_running(cfg: Config, run: Path) -> None:
    cfg.dump(run / runs.CONFIG)
    runs.write_status(run, cfg, "running", started=datetime.now().isoformat(timespec="seconds"))


def open_run(cfg: Config, run_dir: Path | None) -> tuple[Path, runs.RunLock, bool]:
    """The run directory -- given, the newest unfinished one of the same config that no live process
    trains, or a new one -- locked by this process and marked running. In a multi-worker job only
    the chief does this; the other workers write what Keras makes every worker write into a
    scratch folder of their own (they never take the run's lock)."""
    if not is_chief():
        run = Path(tempfile.mkdtemp(prefix="kseg-worker-"))
        lock = runs.RunLock(run)
        lock.acquire()
        log.info(f"worker (not the chief): scratch run folder {run}")
        return run, lock, False
    if run_dir is not None:
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        lock = runs.RunLock(run)
        if not lock.acquire():
            raise ConfigError(f"run directory {run} is being trained by {lock.owner()}")
        resumed = False
    else:
        run, lock, resumed = None, None, False
        for candidate in runs.resumable_runs(cfg):
            candidate_lock = runs.RunLock(candidate)
            if candidate_lock.acquire():
                run, lock, resumed = candidate, candidate_lock, True
                break
            log.info(f"run {candidate} of this config is being trained by {candidate_lock.owner()}; "
                     "not joining it")
        if run is None:
            def contents(folder: Path) -> None:
                nonlocal lock
                lock = runs.RunLock(folder)  # flock holds the file, whatever the folder is renamed to
                if not lock.acquire():
                    raise ConfigError(f"new run directory {folder} was taken by {lock.owner()}")
                _mark_running(cfg, folder)

            run = runs.new_run_dir(cfg, contents)
            lock.path = run / runs.LOCK
    _mark_running(cfg, run)
    log.info(f"run directory: {run}" + (" (resuming an unfinished run)" if resumed else ""))
    return run, lock, resumed


def train(cfg: Config, run_dir: Path | None = None,
          extra_callbacks: list[keras.callbacks.Callback] | tuple = ()) -> TrainResult:
    """Fit ``cfg``'s model; resumes the newest unfinished run of the same config unless ``run_dir``
    is given. ``extra_callbacks`` run after the built-in ones."""
    initialize_processes()
    task = get_task(cfg)
    start = time.perf_counter()
    t = cfg.train
    set_determinism(int(t.seed), bool(t.deterministic))
    if t.schedule == "cosine_restarts":
        cycle_steps(cfg, 1)  # a missing cycle length fails before a run directory exists
    ids, strata = task.prepare()
    train_ids, valid_ids = split_ids(cfg, ids, strata, fold_clusters(cfg, task.data))
    run, lock, _ = open_run(cfg, run_dir)
    try:
        with mixed_precision(t.mixed_precision) as (policy, why):
            return _fit(cfg, task, run, lock, start, f"{policy} ({why})", train_ids, valid_ids, extra_callbacks)
    finally:
        lock.release()
        if not is_chief():
            shutil.rmtree(run, ignore_errors=True)  # a worker's scratch folder: the chief's run is the record


def _fit(cfg: Config, task: Task, run: Path, lock: runs.RunLock, start: float, policy: str, train_ids, valid_ids,
         extra_callbacks) -> TrainResult:
    t = cfg.train

    scope, placement, replicas = strategy_scope(str(t.strategy))
    with scope:
        built = task.build(train_ids, valid_ids)
        encoder = freezing.prepare(cfg, built.inference)  # before compile: BatchNorm layers it freezes
        built.training.compile(optimizer=optimizer(cfg, len(built.batches), encoder), jit_compile=bool(t.xla))
        restored = snapshots.restore(run, built.training)
    # Before fit: Keras may start fetching the first epoch's batches before any callback runs.
    built.batches.set_epoch(restored.epoch)
    if restored.epoch:
        log.info(f"resuming at epoch {restored.epoch} from {restored.source}")
    inference = built.inference
    what = f"; {built.description}" if built.description else ""
    log.info(f"{placement}; policy {policy}; {inference.count_params():,} parameters{what}; "
             f"{len(train_ids)} train / {len(valid_ids)} validation images")

    images, truths = task.validation(valid_ids)
    monitor = task.monitor
    baselines = {}
    for name, predictions in task.baselines(images, truths).items():
        baselines.update(score_predictions(task, predictions, truths, prefix=name))
    logs_dir = run / runs.LOGS
    groups = image_groups(images, [task.data.notes(i) for i in valid_ids] if task.data is not None else None)

    def validation_scores() -> dict[str, float]:
        predictions = task.predict_many(inference, images)
        return {**score_predictions(task, predictions, truths), **score_groups(task, predictions, truths, groups)}

    ema_in, ema_out = ema_callbacks() if float(t.get("ema", 0) or 0) else (None, None)
    average_k = int(t.get("average_checkpoints", 0) or 0)
    average_from = str(t.get("average_from", "last"))
    callbacks = [
        *([ema_in] if ema_in else []),  # the moving average in: validation and checkpoints see it
        EpochSync(built.batches),
        ValidationScore(validation_scores, every=int(t.score_every)),
        BaselineScores(baselines),
        LearningRateLogger(),
        keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: lock.heartbeat()),
        InferenceCheckpoint(inference, run, monitor=monitor, mode="max"),
        *([EpochWeights(inference, run, average_k, average_from, monitor)] if average_k else []),
        *([CycleSnapshots(inference, run, int(t.cycle_epochs))] if t.schedule == "cosine_restarts" else []),
        keras.callbacks.CSVLogger(str(run / runs.HISTORY), append=True),
        keras.callbacks.TensorBoard(log_dir=str(logs_dir), write_graph=False),
        *task.callbacks(inference, logs_dir, images, truths),
        *([ema_out] if ema_out else []),  # the raw weights back before the snapshot: training goes on from them
        EpochSnapshots(run),
        keras.callbacks.TerminateOnNaN(raise_error=True),
    ]
    callbacks += schedule_callbacks(cfg, monitor) + list(extra_callbacks)

    # Whole-image validation batches hold one image, which several replicas cannot split (Keras then
    # fails reducing the replicas' outputs): with more than one replica val_loss is left out and the
    # validation score, computed image by image, is the only validation figure.
    validation = None
    if built.validation_data is not None:
        if replicas == 1:
            validation = variable_size_input(built.validation_data)
        else:
            log.info(f"{replicas} replicas: no val_loss (whole-image validation batches hold one image); {monitor} "
                     "is computed as usual")
    # Batches that can be built by epoch and index are built ahead by workers that live for the
    # whole run; they draw each epoch's batch order as Keras' own shuffling would.
    fed = PrefetchedBatches.of(built.batches) if hasattr(built.batches, "batch_at") else None
    restored.apply_random_state()
    try:
        history = built.training.fit(fed or built.batches, shuffle=fed is None, validation_data=validation,
                                     epochs=int(t.epochs), initial_epoch=restored.epoch, callbacks=callbacks,
                                     verbose=int(t.verbose))
    finally:
        if fed is not None:
            fed.close()

    averaged = {}
    if average_k and is_chief():
        averaged = write_averaged(task, built, inference, run, average_k, average_from, images, truths)
    share_chief_file(run / runs.BEST)  # every process scores the chief's best checkpoint
    best = load_model(run / runs.BEST) if (run / runs.BEST).is_file() else inference
    final = score_predictions(task, task.predict_many(best, images), truths)
    first, *others = final
    scores = {"val_score": final[first], **{f"val_{name}": final[name] for name in others}}
    warnings = stuck_at_baseline(run / runs.HISTORY, monitor, baselines)
    for warning in warnings:
        log.warning(f"warning: {warning}")
    seconds = time.perf_counter() - start
    summary = {"monitor": monitor, **scores, "baselines": baselines, "seconds": round(seconds, 1),
               "train_images": len(train_ids), "valid_images": len(valid_ids), "placement": placement,
               **({"averaged": averaged} if averaged else {}),
               "warnings": warnings, "labels_changed": task.label_report(),
               "images_decoded": task.decoding_report()}
    atomic_write_text(run / runs.RESULTS, json.dumps(summary, indent=1, default=float))
    runs.write_status(run, cfg, "finished", finished=datetime.now().isoformat(timespec="seconds"), **summary)
    snapshots.discard(run)
    return TrainResult(run, history.history, float(scores["val_score"]), baselines, monitor, seconds, warnings)
