"""kseg's messages go through ``logging`` (the ``kseg`` logger), printed to standard error by
default. In a notebook, ``kseg.set_verbosity("warning")`` keeps only warnings and errors; progress
bars (tqdm) are separate (``progress=False`` where a function takes it)."""

from __future__ import annotations

import logging
import sys

from kseg.core.errors import ConfigError

LOGGER_NAME = "kseg"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (notebooks and test capture replace it)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def get_logger(name: str = "") -> logging.Logger:
    """The ``kseg`` logger (or a child of it): INFO and above to standard error unless told otherwise."""
    root = logging.getLogger(LOGGER_NAME)
    if not root.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root.getChild(name) if name else root


def set_verbosity(level: str | int) -> None:
    """``"debug"``, ``"info"`` (the default), ``"warning"`` or ``"error"`` (or a logging level)."""
    if isinstance(level, str):
        name = level.upper()
        if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"verbosity {level!r} is not one of debug, info, warning, error")
        level = getattr(logging, name)
    get_logger().setLevel(level)
