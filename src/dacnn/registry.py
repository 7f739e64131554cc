"""Model registry: ``create_model(name, **kwargs)`` and ``list_models(pattern)``, as in timm.

Each model family file decorates its named builders with :func:`register_model`, passing a
:class:`ModelInfo` that records input size, classes, paper and table row.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

__all__ = ["ModelInfo", "register_model", "create_model", "list_models", "model_info"]


@dataclass(frozen=True)
class ModelInfo:
    """Metadata of a registered model (defaults of its builder)."""

    name: str
    family: str
    input_size: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 100
    paper: str = ""
    table_row: str = ""
    shared_twin: str | None = None  # registered name of the same net with free weights
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, tuple[Callable[..., nn.Module], ModelInfo]] = {}


def register_model(info: ModelInfo) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder under ``info.name``; a duplicate name raises."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if info.name in _REGISTRY:
            raise ValueError(f"model {info.name!r} is already registered")
        _REGISTRY[info.name] = (fn, info)
        return fn

    return decorator


def _lookup(name: str) -> tuple[Callable[..., nn.Module], ModelInfo]:
    _ensure_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}{hint} (see `dacnn models` for all names)")
    return _REGISTRY[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; keyword arguments that are ``None`` are dropped (timm's rule).

    The returned module carries ``model.info`` (a :class:`ModelInfo` with the resolved number of
    classes and input size).
    """
    fn, info = _lookup(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = fn(**kwargs)
    num_classes = kwargs.get("num_classes", info.num_classes)
    in_chans = kwargs.get("in_chans", info.input_size[0])
    model.info = replace(info, num_classes=num_classes, input_size=(in_chans, *info.input_size[1:]))
    return model


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` registered under ``name``."""
    return _lookup(name)[1]


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered names matching an fnmatch ``pattern`` (e.g. ``"dacnn*"``)."""
    _ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def _ensure_loaded() -> None:
    import dacnn.models  # noqa: F401  (registers every family on import)
