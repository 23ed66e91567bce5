"""Model names as the interface: ``@register_model("unet")`` on a builder, ``build_model(name)``.

A pipeline YAML only needs ``model: unet`` plus keyword options; unknown names and unknown
options fail with a ``ConfigError`` that lists what would work.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from kseg.core.errors import ConfigError

# The built-in families live above this layer (kseg.tasks); they hand the registry a function that
# imports them, called on the first lookup, so a name resolves without its family imported first.
_builtin_loader: Callable[[], None] | None = None


def set_builtin_loader(loader: Callable[[], None]) -> None:
    """Called once by :mod:`kseg.tasks.base` with the function that imports the built-in families."""
    global _builtin_loader, _builtins_loaded
    _builtin_loader = loader
    _builtins_loaded = False


@dataclass(frozen=True)
class ModelEntry:
    """One registered builder.

    ``task`` says what the model maps an image to: ``"semantic"`` builders return a
    per-pixel output of the input's height and width (the shared model tests rely on it).
    ``divisor`` gives the multiple that input height and width must be, for given options.
    """

    name: str
    builder: Callable[..., Any]
    task: str = "semantic"
    divisor: Callable[..., int] | int | None = None

    def input_divisor(self, **kwargs: Any) -> int:
        if self.divisor is None:
            return 1
        if callable(self.divisor):
            return int(self.divisor(**kwargs))
        return int(self.divisor)


_REGISTRY: dict[str, ModelEntry] = {}
_builtins_loaded = False


def register_model(
    name: str,
    *,
    task: str = "semantic",
    divisor: Callable[..., int] | int | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a builder function under ``name`` (returns the function unchanged).

    ``divisor`` is an int or a callable taking the builder's keyword options (it should
    accept and ignore extra ones) and returning the multiple input sizes must have.
    """

    def decorate(builder: Callable[..., Any]) -> Callable[..., Any]:
        old = _REGISTRY.get(name)
        if old is not None and _qualified(old.builder) != _qualified(builder):
            raise ConfigError(
                f"model name {name!r} is already registered by {_qualified(old.builder)}; "
                f"pick another name for {_qualified(builder)}"
            )
        _REGISTRY[name] = ModelEntry(name=name, builder=builder, task=task, divisor=divisor)
        return builder

    return decorate


def _qualified(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True  # first, so a family module's own lookups during its import do not recurse
    if _builtin_loader is not None:
        _builtin_loader()


def list_models(task: str | None = None) -> list[str]:
    """Sorted registered names, optionally only those of one ``task``."""
    _load_builtins()
    return sorted(n for n, e in _REGISTRY.items() if task is None or e.task == task)


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; ConfigError naming close matches when unknown."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = sorted(_REGISTRY)
        close = difflib.get_close_matches(str(name), known, n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        if _builtin_loader is None:
            hint += "; the built-in families register when kseg.models (or kseg.tasks.base) is imported"
        raise ConfigError(
            f"unknown model {name!r}{hint} (registered: {', '.join(known)})"
        ) from None


def _check_options(entry: ModelEntry, kwargs: dict[str, Any]) -> None:
    params = inspect.signature(entry.builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, accepted, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"model {entry.name!r} has no option {', '.join(hints)}; "
            f"its options are: {', '.join(accepted)}"
        )


def build_model(name: str, **kwargs: Any):
    """Build the registered model ``name`` with keyword options (the inference model)."""
    entry = get_model_entry(name)
    _check_options(entry, kwargs)
    return entry.builder(**kwargs)


def input_divisor(name: str, **kwargs: Any) -> int:
    """The multiple that input height and width must be for ``build_model(name, **kwargs)``.

    Generators and predictors use it with ``check_input_size`` when the model was built with
    dynamic (None, None) spatial dimensions.
    """
    entry = get_model_entry(name)
    _check_options(entry, kwargs)
    return entry.input_divisor(**kwargs)
