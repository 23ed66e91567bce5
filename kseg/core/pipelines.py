"""Reading the pipeline YAML files: the shipped folder, and ``base`` chains merged in order.

Kept apart from :mod:`kseg.core.config` so the typed schema (:mod:`kseg.core.schema`) can read the
shipped ``_base.yaml`` without importing the loader that calls it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import yaml

from kseg.core.errors import ConfigError

BASE_NAME = "_base.yaml"


def _shipped_pipelines() -> Path:
    """The shipped pipelines: inside the installed package (``kseg/pipelines``, package data), or
    the checkout's top-level ``pipelines/`` folder, their one source."""
    installed = Path(__file__).resolve().parents[1] / "pipelines"
    if (installed / BASE_NAME).is_file():
        return installed
    return Path(__file__).resolve().parents[2] / "pipelines"


PIPELINES_DIR = _shipped_pipelines()


def deep_merge(base: dict, update: Mapping) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_raw(path: str | Path) -> dict:
    """Read a pipeline file with its ``base`` chain merged in (base first)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = read_yaml(path)
    base_name = data.pop("base", None if path.name == BASE_NAME else BASE_NAME)
    if base_name is None:
        return data
    base_path = path.parent / base_name
    if base_name == BASE_NAME and not base_path.is_file():
        base_path = PIPELINES_DIR / BASE_NAME  # a user's own file inherits the shipped base
    if base_path.resolve() == path.resolve():
        raise ConfigError(f"{path}: a config cannot be its own base")
    base = load_raw(base_path)
    merged = deep_merge(base, data)
    if pipeline_model(data) not in (None, pipeline_model(base)):
        # Another builder: the base's arguments belong to the base's model, not this one.
        merged["model"]["args"] = copy.deepcopy(data["model"].get("args") or {})
    return merged


def pipeline_model(data: Mapping) -> str | None:
    model = data.get("model")
    return model.get("name") if isinstance(model, Mapping) else None
