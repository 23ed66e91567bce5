"""kseg: from a Kaggle segmentation competition folder to a validated submission.

The Python API (documented in the README) is re-exported here lazily, so ``import kseg`` and
``import kseg.rle`` stay light (Keras costs seconds to import): ``kseg.load_config``, ``kseg.train``,
``kseg.predict``, ``kseg.submit``, ``kseg.tune``, ``kseg.cross_validate``, ``kseg.load_model``,
``kseg.set_verbosity``.

Data flows one way, layer by layer (import-linter checks it; see README "Layout"):
``kseg.core`` <- ``kseg.codecs`` <- ``kseg.io`` (readers) <- ``kseg.data`` (preprocessing, weight
maps, augmentation, splits) / ``kseg.nn`` (building blocks) / ``kseg.metrics`` <- ``kseg.tasks``
(one folder per model family, peers) <- ``kseg.engine`` (the fit loop) / ``kseg.submission`` (the
submission loop) <- ``kseg.app`` (API, CLI, tune, evaluate). Lower layers never import higher ones.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_config": "kseg.app.api",
    "train": "kseg.app.api",
    "predict": "kseg.app.api",
    "submit": "kseg.app.api",
    "tune": "kseg.app.api",
    "cross_validate": "kseg.app.api",
    "load_model": "kseg.tasks.base",
    "set_verbosity": "kseg.core.log",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kseg' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
