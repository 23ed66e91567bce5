"""Pipeline configuration: YAML files in ``pipelines/`` + ``key=value`` overrides -> one frozen Config.

A pipeline file may name a ``base`` (another file in the same folder, ``_base.yaml`` by default) and
overrides only what differs; a user's own YAML with no ``_base.yaml`` beside it inherits the
packaged one. ``DATASET=name`` on the command line resolves through :func:`resolve_pipeline`, which
is the dataset registry: every non-underscore YAML file in the shipped pipelines folder registers
the ``dataset.name`` / ``model.name`` pair it declares.

Paths belong to the user: data, cache, runs and submissions resolve against the working directory
(or ``KSEG_HOME`` when set), never the folder kseg is installed in. A relative ``dataset.root``
written in a user's pipeline file resolves against that file's folder; in a shipped pipeline, or
given on the command line, against the working directory. :func:`load_config` makes every such
path absolute, so a run's ``config.yaml`` records where things really were.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from kseg.core.errors import ConfigError
from kseg.core.fileio import atomic_write_text
from kseg.core.pipelines import (
    BASE_NAME,
    PIPELINES_DIR,
    deep_merge,
    load_raw,
    pipeline_model,
    read_yaml,
)
from kseg.core.schema import validate_config

# Config keys that hold paths of the user's (made absolute by load_config).
PATH_KEYS = (("dataset", "root"), ("preprocess", "cache_dir"), ("train", "runs_dir"), ("submission", "dir"))
# Mappings under these keys are free-form (passed to a builder as keyword arguments), so an
# override may add keys there; everywhere else an unknown key is a typo and an error.
FREE_FORM_KEYS = frozenset({"args", "loss_args", "encoder_args", "options"})


class Config(Mapping):
    """A read-only nested mapping with attribute access (``cfg.train.epochs``)."""

    def __init__(self, data: Mapping[str, Any]):
        self._data = {key: _freeze(value) for key, value in data.items()}

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._data[key]
        except KeyError:
            raise AttributeError(f"config has no key {key!r} (keys: {sorted(self._data)})") from None

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"

    def to_dict(self) -> dict[str, Any]:
        """A plain, mutable deep copy (for YAML dumps and ``**kwargs``)."""
        return {key: _thaw(value) for key, value in self._data.items()}

    def fingerprint(self, *sections: str) -> str:
        """A stable hash of the given sections (all when none) for cache keys."""
        chosen = self.to_dict() if not sections else {s: _thaw(self._data.get(s)) for s in sections}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()

    def dump(self, path: str | Path) -> None:
        """Write the resolved config as YAML (atomically), e.g. into a run directory."""

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping) and not isinstance(value, Config):
        return Config(value)
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply ``a.b.c=value`` strings; values are parsed as YAML (``3``, ``true``, ``[1, 2]``)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key_path, raw_value = item.split("=", 1)
        keys = key_path.strip().split(".")
        value = _parse_value(raw_value, item)
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if not isinstance(child, dict):
                if key in node or not _free_form(keys[:depth]):
                    raise ConfigError(_unknown_key_message(key_path, keys[: depth + 1], node))
                child = node[key] = {}
            node = child
        last = keys[-1]
        if last not in node and not _free_form(keys[:-1]):
            raise ConfigError(_unknown_key_message(key_path, keys, node))
        node[last] = value
    return data


def _parse_value(raw: str, item: str) -> Any:
    """YAML scalars and lists; also ``1e-3``, which YAML 1.1 would leave a string."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _free_form(parent_keys: list[str]) -> bool:
    return bool(parent_keys) and parent_keys[-1] in FREE_FORM_KEYS


def _unknown_key_message(key_path: str, keys: list[str], node: Mapping) -> str:
    where = ".".join(keys[:-1]) or "the top level"
    return (
        f"override {key_path!r}: {keys[-1]!r} is not a key of {where} "
        f"(known: {', '.join(sorted(map(str, node))) or 'none'})"
    )


def pipeline_files(directory: Path = PIPELINES_DIR) -> list[Path]:
    """Every registered pipeline (YAML files not starting with an underscore)."""
    return sorted(p for p in directory.glob("*.yaml") if not p.name.startswith("_"))


def registry(directory: Path = PIPELINES_DIR) -> dict[tuple[str, str], Path]:
    """``(dataset name, model name) -> pipeline file`` for every registered pipeline."""
    table: dict[tuple[str, str], Path] = {}
    for path in pipeline_files(directory):
        raw = load_raw(path)
        key = (raw.get("dataset", {}).get("name", path.stem), raw.get("model", {}).get("name", ""))
        if key in table:
            raise ConfigError(f"{path} and {table[key]} both register dataset/model {key}")
        table[key] = path
    return table


def resolve_pipeline(dataset: str, model: str | None = None, directory: Path = PIPELINES_DIR) -> tuple[Path, bool]:
    """Find the pipeline file for ``DATASET=name`` (and optionally ``MODEL=name``).

    ``dataset`` may also be a path to a YAML file. Returns the file and whether the model name
    still has to be overridden (when the dataset has no pipeline for that model, its first
    pipeline is used with ``model.name`` replaced).
    """
    as_path = Path(dataset)
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return as_path, model is not None
    table = registry(directory)
    # Without MODEL=, a dataset's pipeline for the default builder wins over its variants (FCN, ...).
    base = directory / "_base.yaml"
    wanted = model or (pipeline_model(load_raw(base)) if base.is_file() else None)
    for (name, model_name), path in table.items():
        if name == dataset and (wanted is None or model_name == wanted):
            return path, False
    for (name, _), path in table.items():
        if name == dataset:
            return path, model is not None
    known = sorted({name for name, _ in table})
    raise ConfigError(f"unknown dataset {dataset!r}; registered datasets: {', '.join(known)} (files in {directory})")


def load_config(
    dataset: str = "demo",
    model: str | None = None,
    overrides: Iterable[str] = (),
    data_root: str | None = None,
    directory: Path = PIPELINES_DIR,
) -> Config:
    """Resolve a dataset (and model) name to a frozen Config with overrides applied.

    ``data_root`` is the ``DATA=path`` shortcut for ``dataset.root``.
    """
    path, override_model = resolve_pipeline(dataset, model, directory)
    data = load_raw(path)
    own_root = (read_yaml(path).get("dataset") or {}).get("root")
    if own_root and not Path(own_root).expanduser().is_absolute() and not _is_shipped(path, directory):
        data["dataset"]["root"] = str(path.resolve().parent / Path(own_root).expanduser())
    extra = list(overrides)
    if override_model and model and model != pipeline_model(data):
        # The pipeline was written for another builder: start from this builder's defaults.
        data.setdefault("model", {})["args"] = {}
        extra.insert(0, f"model.name={model}")
    if data_root:
        extra.insert(0, f"dataset.root={data_root}")
    data = apply_overrides(data, extra)
    for section, key in PATH_KEYS:
        if isinstance(data.get(section), dict) and data[section].get(key):
            data[section][key] = str(project_path(data[section][key]))
    data.setdefault("pipeline", str(path.relative_to(directory.parent) if path.is_relative_to(directory.parent) else path))
    if Path(directory).resolve() == PIPELINES_DIR.resolve():  # another folder's _base.yaml defines its own keys
        validate_config(data, str(data["pipeline"]))
    return Config(data)


def _is_shipped(path: Path, directory: Path) -> bool:
    return path.resolve().parent == directory.resolve()


def home() -> Path:
    """Where the user's relative paths start: ``KSEG_HOME`` when set, else the working directory."""
    return Path(os.environ.get("KSEG_HOME") or os.getcwd()).expanduser()


def project_path(path: str | Path) -> Path:
    """A config path as the user means it: absolute as given, relative to :func:`home` otherwise."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else home() / path


__all__ = ["BASE_NAME", "PIPELINES_DIR", "Config", "apply_overrides", "deep_merge", "home", "load_config",
           "load_raw", "pipeline_files", "project_path", "registry", "resolve_pipeline"]
