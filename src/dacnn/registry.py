"""Model registry: ``create_model(name, pretrained=False, **kwargs)``, ``list_models``, ``list_pretrained``.

As in timm: each model family file registers its variants (:func:`register_model`) from a table of
configs, each with a :class:`ModelInfo` (input size, classes, mean/std, first conv, classifier, paper
row) and any released weights as :class:`PretrainedCfg` entries named ``<model>.<tag>`` (timm's
``model.tag`` convention, e.g. ``lrunet_1x.fashion_mnist_n10``). The registry never imports the
model families; :mod:`dacnn` (the package) does, so ``import dacnn`` registers every model.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from dacnn import hub, tying
from dacnn.hub import PretrainedCfg

__all__ = [
    "ModelInfo", "PretrainedCfg", "register_model", "register_pretrained", "create_model", "list_models",
    "list_pretrained", "model_info", "pretrained_cfg", "split_tag", "variant_args",
]


@dataclass(frozen=True)
class ModelInfo:
    """Metadata of a registered model; :func:`create_model` returns a copy resolved to its kwargs.

    ``first_conv`` / ``classifier`` are qualified module names (timm's ``first_conv``/``classifier``
    cfg keys); ``mean``/``std`` the input normalisation the model expects (``None``: the training
    dataset's own statistics; LruNet's reference feeds pixels / 255, i.e. mean 0, std 1);
    ``model_kwargs`` the keyword arguments it was built with.
    """

    name: str
    family: str
    input_size: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 100
    paper: str = ""
    table_row: str = ""
    shared_twin: str | None = None  # registered name of the same net with free weights
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    first_conv: str = ""
    classifier: str = "fc"
    mean: tuple[float, ...] | None = None  # None: the training dataset's mean/std (dacnn.data.DATASETS)
    std: tuple[float, ...] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained_tag: str | None = None


_REGISTRY: dict[str, tuple[Callable[..., nn.Module], ModelInfo]] = {}
_PRETRAINED: dict[str, dict[str, PretrainedCfg]] = {}


def register_model(info: ModelInfo) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder under ``info.name``; a duplicate name raises."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if info.name in _REGISTRY:
            raise ValueError(f"model {info.name!r} is already registered")
        _REGISTRY[info.name] = (fn, info)
        return fn

    return decorator


def variant_args(
    variant: str, cfg: dict[str, Any], kwargs: dict[str, Any], defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A variant's config plus the caller's kwargs over its ``defaults``; a kwarg the config fixes is
    a ``TypeError`` (as timm's ``dict(**cfg, **kwargs)``): ``dacnn14`` is depth 14, the generic
    ``dacnn`` takes any depth; ``dacnn18_reg``'s regulators (``"all"``) are a default."""
    clash = sorted(set(cfg) & set(kwargs))
    if clash:
        fixed = ", ".join(f"{k}={cfg[k]!r}" for k in clash)
        raise TypeError(f"{variant} fixes {fixed}; build the family's generic model to change it")
    return {**(defaults or {}), **cfg, **kwargs}


def register_pretrained(model: str, cfg: PretrainedCfg) -> None:
    """Add released weights ``<model>.<cfg.tag>`` (the first tag registered is the default)."""
    tags = _PRETRAINED.setdefault(model, {})
    if cfg.tag in tags:
        raise ValueError(f"pretrained {model}.{cfg.tag} is already registered")
    tags[cfg.tag] = cfg


def split_tag(name: str) -> tuple[str, str | None]:
    """``"lrunet_1x.cifar10_n14"`` -> ``("lrunet_1x", "cifar10_n14")``; no dot -> tag ``None``."""
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def _lookup(name: str) -> tuple[Callable[..., nn.Module], ModelInfo]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}{hint} (see `dacnn models` for all names)")
    return _REGISTRY[name]


def pretrained_cfg(name: str) -> PretrainedCfg:
    """The :class:`PretrainedCfg` of ``"<model>.<tag>"`` (or a model's default tag)."""
    arch, tag = split_tag(name)
    _lookup(arch)
    tags = _PRETRAINED.get(arch, {})
    if not tags:
        raise KeyError(f"model {arch!r} has no pretrained weights (see dacnn.list_pretrained())")
    if tag is None:
        tag = next(iter(tags))
    if tag not in tags:
        raise KeyError(f"no pretrained weights {arch}.{tag}; {arch} has: {', '.join(sorted(tags))}")
    return tags[tag]


def create_model(
    name: str, pretrained: bool = False, *, weights_dir: str | Path | None = None, **kwargs: Any
) -> nn.Module:
    """Build a registered model; keyword arguments that are ``None`` are dropped (timm's rule).

    ``name`` may carry a pretrained tag (``"lrunet_1x.fashion_mnist_n10"``): its config (e.g.
    ``layer_reuse``, ``in_chans``, ``num_classes``) becomes the default kwargs, and with
    ``pretrained=True`` the weights are loaded from the weights directory (:func:`dacnn.hub.find_weights`).
    The returned module carries ``model.info``, a :class:`ModelInfo` resolved to the kwargs used and,
    for a tag, to how its weights are fed (input size, mean/std: :class:`PretrainedCfg`).

    ``share_budget="ratio=0.5"`` (or ``"max_params=N"``) ties the model's isomorphic convs with
    :func:`dacnn.share_kernels` (scope ``"global"``) after building it, largest saving first, until the
    budget is met; it is kept in ``model.info.model_kwargs``, so a saved model is rebuilt tied.
    """
    arch, tag = split_tag(name)
    fn, info = _lookup(arch)
    cfg = pretrained_cfg(name) if (pretrained or tag) else None
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if cfg is not None:
        kwargs = {**cfg.model_kwargs, **kwargs}
    build = {k: v for k, v in kwargs.items() if k != "share_budget"}
    model = fn(**build)
    if "share_budget" in kwargs:  # the plug-in sharing, part of the architecture (rebuilt on load)
        tying.share_kernels(model, "global", budget=kwargs["share_budget"])
    num_classes = kwargs.get("num_classes", info.num_classes)
    in_chans = kwargs.get("in_chans", info.input_size[0])
    height_width = (cfg.input_size if cfg is not None and cfg.input_size else info.input_size)[1:]
    mean, std = _per_channel(info.mean, in_chans), _per_channel(info.std, in_chans)
    if cfg is not None:  # the weights' feeding: pixels / 255 as they are, or the dataset's statistics
        mean, std = ((0.0,) * in_chans, (1.0,) * in_chans) if not cfg.normalize else (None, None)
    model.info = replace(
        info, num_classes=num_classes, input_size=(in_chans, *height_width), mean=mean, std=std,
        model_kwargs=dict(kwargs), pretrained_tag=cfg.tag if cfg else None,
    )
    if pretrained:
        hub.load_pretrained(model, cfg, weights_dir)
    return model


def _per_channel(values: tuple[float, ...] | None, chans: int) -> tuple[float, ...] | None:
    """Registered per-channel ``values`` for ``chans`` channels: one value for all is repeated; values
    that differ per channel fit no other channel count (``None``: the training dataset's statistics)."""
    if values is None or len(values) == chans:
        return values
    return (values[0],) * chans if len(set(values)) == 1 else None


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` registered under ``name`` (a pretrained tag is ignored)."""
    return _lookup(split_tag(name)[0])[1]


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Sorted registered names matching an fnmatch ``pattern`` (e.g. ``"dacnn*"``); with
    ``pretrained`` only models that have released weights."""
    names = _PRETRAINED if pretrained else _REGISTRY
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))


def list_pretrained(pattern: str = "*") -> list[str]:
    """Sorted ``<model>.<tag>`` names of every registered set of weights matching ``pattern``."""
    names = (f"{arch}.{tag}" for arch, tags in _PRETRAINED.items() for tag in tags)
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))
