"""The task protocol: a task is the unit of a model family (semantic U-Net/FCN, SSD boxes, Mask
R-CNN instances), and the engine's fit loop and the submission loop work through it alone.

A family is one folder under ``kseg/tasks/`` holding its model builders, heads, losses, targets,
batches and a :class:`Task` subclass registered with :func:`register_task`. Its model builders
register with ``@register_model(name, task=<task name>)``; a config's ``model.name`` thus names
its task. The engine never imports a family: :func:`get_task` finds it through the registries.

What a task answers, in the order the fit loop asks:

* ``prepare()``: the labelled ids and their fold strata (preprocessing the data if needed);
* ``build(train_ids, valid_ids)``: inference model, training model, training batches and
  (optionally) validation batches for ``fit``, built inside the distribution scope;
* ``validation(valid_ids)``: the validation images and truths, kept for scoring;
* ``evaluator()`` and ``predict_many(model, images)``: how validation images are predicted and
  scored (the first evaluator name is the monitor, ``val_<name>``);
* ``callbacks(inference, logs_dir)``: TensorBoard pictures;
* ``baselines()``: classical predictions of the validation images, scored by the same evaluator.

For ``make submit``: ``ensemble`` (whether runs can be averaged), ``check_format(fmt, runs)`` and
``submission(members, overrides)``, an object that reads, predicts, writes rows and draws each
test image (:class:`Submission`).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import keras
import numpy as np

from kseg.core import runs
from kseg.core.config import Config
from kseg.core.errors import ConfigError, DataError
from kseg.core.runs import run_config
from kseg.data.preprocess import split_integrity
from kseg.metrics.evaluators import Evaluator
from kseg.nn import registry

# Packages whose import registers a built-in family (its models and its task).
BUILTIN_TASKS = ("kseg.tasks.semantic", "kseg.tasks.ssd", "kseg.tasks.maskrcnn")
# averaged: train.average_checkpoints; cycles: the snapshot of every cosine_restarts cycle, an ensemble
# (kseg.engine.averaging)
CHECKPOINTS = ("best", "last", "averaged", "cycles")
CYCLES_DIR = "cycles"


@dataclasses.dataclass
class Built:
    """What a task builds for one fit: the models share their layers."""

    inference: keras.Model
    training: keras.Model
    batches: Any  # a keras.utils.PyDataset with ``set_epoch``
    validation_data: Any = None  # for ``fit(validation_data=...)`` (val_loss), or None
    description: str = ""  # e.g. "8732 default boxes", printed with the parameter count


class Submission(Protocol):
    """One run (or an ensemble) ready to predict test images, as the submission loop uses it."""

    postprocess: dict  # what the rows were made with, reported with the CSV
    num_classes: int | None  # classes per image for per-class formats (known after the first image)

    def read(self, path: Path) -> np.ndarray: ...

    def predict(self, image: np.ndarray) -> Any: ...

    def panel(self, image: np.ndarray, target: Any) -> tuple[np.ndarray, np.ndarray]:
        """(picture, label image) for the contact sheet: the label image's outlines are drawn."""


class Task:
    """Base class of a model family; see the module notes for what each method answers."""

    name: ClassVar[str] = ""  # the registry key: model builders register with task=<name>
    kind: ClassVar[str] = ""  # semantic | instance | boxes: what ``predict`` returns
    ensemble: ClassVar[bool] = False  # several runs (folds) can be averaged by make submit
    tuning_hint: ClassVar[str] = ""  # why ``make tune`` does not apply ({run}, {model}), and what to set instead

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.data = None  # the preprocessed dataset, once ``prepare`` has read it (fold clusters, notes)

    # -- training ---------------------------------------------------------------------------------
    def prepare(self) -> tuple[list[str], list[str] | None]:
        raise NotImplementedError

    def build(self, train_ids: Sequence[str], valid_ids: Sequence[str]) -> Built:
        raise NotImplementedError

    def validation(self, valid_ids: Sequence[str]) -> tuple[list, list]:
        """(images as ``predict_many`` takes them, truths as the evaluator takes them)."""
        raise NotImplementedError

    def evaluator(self) -> Evaluator:
        raise NotImplementedError

    @property
    def monitor(self) -> str:
        return f"val_{self.evaluator().names[0]}"

    def predict_many(self, model: keras.Model, images: Sequence) -> list:
        """Each validation image's prediction in the form the evaluator takes."""
        raise NotImplementedError

    def callbacks(self, inference: keras.Model, logs_dir: Path, images: list, truths: list) -> list:
        return []

    def label_report(self) -> dict:
        """What preprocessing changed in the labels and counted (:attr:`PreprocessedDataset.integrity`),
        for the run's ``results.json``; empty when nothing was changed or the family reads no masks."""
        return split_integrity(self._integrity())[0]

    def decoding_report(self) -> dict:
        """What the intensity policy did to the training images (``preprocess.intensity``), counted
        per kind, for the run's ``results.json``; empty when every image was 8-bit as read."""
        return split_integrity(self._integrity())[1]

    def _integrity(self) -> dict:
        data = getattr(self, "data", None)
        if data is not None:
            return dict(getattr(data, "integrity", None) or {})
        decoder = getattr(getattr(self, "source", None), "images", None)  # a box reader's ImageDecoder
        return dict(getattr(decoder, "integrity", None) or {})

    def baselines(self, images: list, truths: list) -> dict[str, list]:
        """``{name: predictions of the validation images}`` of the classical baselines."""
        return {}

    # -- submission -------------------------------------------------------------------------------
    def check_format(self, fmt, run_dirs: Sequence[Path], formats: Sequence = ()) -> None:
        """Raise ConfigError when ``fmt`` cannot hold this family's predictions (``formats``: every
        format, for the message), or when several runs are given and the family cannot average them."""
        if len(run_dirs) > 1 and not self.ensemble:
            raise ConfigError(f"{self.cfg.model.name} runs cannot be averaged; submit one run")

    def submission(self, members: Sequence[LoadedModel], fmt, overrides: Sequence[str] = ()) -> Submission:
        raise NotImplementedError


# -- registries --------------------------------------------------------------------------------------
_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register a family's task under ``cls.name``."""
    if not cls.name:
        raise ConfigError(f"task class {cls.__qualname__} has no name")
    old = _TASKS.get(cls.name)
    if old is not None and old.__qualname__ != cls.__qualname__:
        raise ConfigError(f"task name {cls.name!r} is already registered by {old.__qualname__}")
    _TASKS[cls.name] = cls
    return cls


def load_builtin_tasks() -> None:
    for package in BUILTIN_TASKS:
        importlib.import_module(package)


registry.set_builtin_loader(load_builtin_tasks)


def task_class(model_name: str) -> type[Task]:
    """The task class of the family that registered the model ``model_name``."""
    entry = registry.get_model_entry(model_name)  # loads the built-in families
    if entry.task not in _TASKS:
        raise ConfigError(f"model {model_name!r} belongs to task {entry.task!r}, which has no registered Task "
                          f"(registered: {', '.join(sorted(_TASKS))})")
    return _TASKS[entry.task]


def get_task(cfg: Config) -> Task:
    """The task object of ``cfg.model.name``'s family for this config."""
    return task_class(cfg.model.name)(cfg)


# -- runs and checkpoints ----------------------------------------------------------------------------
def load_model(path):
    """Load a saved ``.keras`` model (e.g. a run's ``best.keras``) without compiling it.

    The built-in families are imported first: they register the custom layers and initializers
    Keras needs to rebuild a saved model.
    """
    registry.list_models()
    return keras.saving.load_model(path, compile=False)


@dataclasses.dataclass
class LoadedModel:
    """One run's inference model with the config that says how to feed it."""

    run_dir: Path
    cfg: Config
    model: keras.Model
    pad_multiple: int
    checkpoint: str


def load_members(run_dir: str | Path, checkpoint: str = "best", overrides: Iterable[str] = ()) -> list[LoadedModel]:
    """The models a run predicts with: its one checkpoint, or (``cycles``) the snapshot of every
    cosine-restart cycle, which an ensemble averages like folds."""
    if checkpoint != "cycles":
        return [load_run(run_dir, checkpoint, overrides)]
    run_dir = Path(run_dir)
    files = sorted((run_dir / CYCLES_DIR).glob("cycle-*.keras"))
    if not files:
        raise DataError("no cycle snapshot (cycles/cycle-<k>.keras): train with train.schedule=cosine_restarts and "
                        "train.cycle_epochs=N, or predict with another predict.checkpoint", run_dir)
    cfg = run_config(run_dir, overrides)
    divisor = int(registry.input_divisor(cfg.model.name, **dict(cfg.model.args or {})))
    return [LoadedModel(run_dir, cfg, load_model(path), divisor, f"{CYCLES_DIR}/{path.stem}") for path in files]


def load_run(run_dir: str | Path, checkpoint: str = "best", overrides: Iterable[str] = ()) -> LoadedModel:
    """Load ``best.keras`` (or ``last.keras``) of a run; ``best`` falls back to ``last`` when no
    epoch was scored."""
    run_dir = Path(run_dir)
    if checkpoint not in CHECKPOINTS or checkpoint == "cycles":
        raise ConfigError(f"checkpoint {checkpoint!r} must be one of {CHECKPOINTS[:-1]} (cycles: load_members)")
    cfg = run_config(run_dir, overrides)
    path = run_dir / f"{checkpoint}.keras"
    if not path.is_file() and checkpoint == "best" and (run_dir / runs.LAST).is_file():
        path, checkpoint = run_dir / runs.LAST, "last"
    if not path.is_file():
        raise DataError(f"no {checkpoint}.keras checkpoint (did training finish an epoch?)", run_dir)
    model = load_model(path)
    divisor = int(registry.input_divisor(cfg.model.name, **dict(cfg.model.args or {})))
    return LoadedModel(run_dir, cfg, model, divisor, checkpoint)
