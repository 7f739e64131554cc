"""Model registry: ``create_model(name, pretrained=False, **kwargs)``, ``list_models``, ``list_pretrained``.

As in timm (``timm/models/_registry.py``, ``_builder.py``): each model family file has a table of
configs and a ``default_cfgs`` dict of :class:`ModelInfo` (input size, classes, mean/std, first conv,
classifier, paper row), and registers each variant as a function
``@register_model def <name>(pretrained: bool = False, **kwargs)`` calling its family's
``_create_<family>()``, which calls :func:`build_model_with_cfg`. Released weights are
:class:`PretrainedCfg` entries named ``<model>.<tag>`` (timm's ``model.tag`` convention, e.g.
``lrunet_1x.fashion_mnist_n10``). The registry never imports the model families; :mod:`dacnn` (the
package) does, so ``import dacnn`` registers every model.

Every model :func:`build_model_with_cfg` returns carries ``model.info`` (a :class:`ModelInfo` resolved
to the kwargs used) and ``model.pretrained_cfg`` / ``model.default_cfg``, a dict with the keys of timm's
``PretrainedCfg`` (``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``, ``num_classes``,
``pool_size``, ``first_conv``, ``classifier``, ``license``, ``paper_ids``...), so timm's
``resolve_model_data_config(model)`` gives the model's real input: 32x32 CIFAR statistics unless its
weights say otherwise.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from dacnn import hub, tying
from dacnn.data.catalog import DATASETS
from dacnn.features import FeatureGetterNet
from dacnn.hub import PretrainedCfg

__all__ = [
    "ModelInfo", "PretrainedCfg", "register_model", "register_pretrained", "create_model", "list_models",
    "list_pretrained", "model_info", "pretrained_cfg", "split_tag", "variant_args", "build_model_with_cfg",
    "timm_pretrained_cfg",
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


# name -> (timm-style entrypoint ``fn(pretrained=False, **kwargs)``, info)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], ModelInfo]] = {}
_PRETRAINED: dict[str, dict[str, PretrainedCfg]] = {}


def _add(info: ModelInfo, entrypoint: Callable[..., nn.Module]) -> None:
    if info.name in _REGISTRY:
        raise ValueError(f"model {info.name!r} is already registered")
    _REGISTRY[info.name] = (entrypoint, info)


def register_model(arg: Any) -> Any:
    """Register a model, in either of two forms.

    * timm's: ``@register_model`` on ``def <name>(pretrained: bool = False, **kwargs)``, a function
      that builds through :func:`build_model_with_cfg`; its :class:`ModelInfo` is
      ``default_cfgs[<name>]`` of the function's module (timm's ``default_cfgs`` table);
    * ``@register_model(ModelInfo(...))`` on a plain builder ``fn(**kwargs) -> nn.Module`` (a class or
      function of your own): the registry wraps it in :func:`build_model_with_cfg`.

    A duplicate name raises ``ValueError``.
    """
    if isinstance(arg, ModelInfo):
        info = arg

        def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
            def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
                return build_model_with_cfg(fn, info.name, pretrained, **kwargs)

            _add(info, entrypoint)
            return fn

        return decorator
    fn = arg
    module = sys.modules[fn.__module__]
    table = getattr(module, "default_cfgs", {})
    if fn.__name__ not in table:
        raise ValueError(f"@register_model {fn.__module__}.{fn.__name__}: no default_cfgs[{fn.__name__!r}] "
                         f"(a ModelInfo) in its module")
    _add(table[fn.__name__], fn)
    names = getattr(module, "__all__", None)
    if isinstance(names, list) and fn.__name__ not in names:
        names.append(fn.__name__)  # timm's habit: a registered function is public
    return fn


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
    for a tag, to how its weights are fed (input size, mean/std: :class:`PretrainedCfg`), and
    ``model.pretrained_cfg`` (timm's dict, see the module docstring).

    timm's keyword arguments work on every model: ``drop_rate``, ``drop_path_rate`` (refused with a
    sentence where a model has no residual branch to drop), ``in_chans``, ``global_pool``, and
    ``features_only=True`` with ``out_indices`` (one feature map per stage, :class:`FeatureGetterNet`).

    ``share_budget="ratio=0.5"`` (or ``"max_params=N"``) ties the model's isomorphic convs with
    :func:`dacnn.share_kernels` (scope ``"global"``) after building it, largest saving first, until the
    budget is met; it is kept in ``model.info.model_kwargs``, so a saved model is rebuilt tied.
    """
    arch, tag = split_tag(name)
    fn, _ = _lookup(arch)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return fn(pretrained=pretrained, pretrained_tag=tag, weights_dir=weights_dir, **kwargs)


def build_model_with_cfg(
    builder: Callable[..., nn.Module],
    variant: str,
    pretrained: bool = False,
    *,
    pretrained_tag: str | None = None,
    weights_dir: str | Path | None = None,
    features_only: bool = False,
    out_indices: int | list[int] | tuple[int, ...] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """timm's ``build_model_with_cfg``: ``builder(**kwargs)`` for registered ``variant``, with the
    pretrained tag's kwargs as defaults, ``share_budget`` applied, ``model.info`` and
    ``model.pretrained_cfg`` set, the weights loaded when ``pretrained``, and wrapped in a
    :class:`FeatureGetterNet` when ``features_only``."""
    _, info = _lookup(variant)
    cfg = pretrained_cfg(f"{variant}.{pretrained_tag}" if pretrained_tag else variant) \
        if (pretrained or pretrained_tag) else None
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if cfg is not None:
        kwargs = {**cfg.model_kwargs, **kwargs}
    build = {k: v for k, v in kwargs.items() if k != "share_budget"}
    model = builder(**build)
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
    model.pretrained_cfg = timm_pretrained_cfg(model.info, cfg, _pool_size(model, model.info.input_size))
    model.default_cfg = model.pretrained_cfg  # timm's older name, the same dict
    if pretrained:
        hub.load_pretrained(model, cfg, weights_dir)
    if features_only:
        features = FeatureGetterNet(model, out_indices)
        features.info = model.info
        return features
    return model


def _pool_size(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[int, int] | None:
    size = getattr(model, "feature_size", None)
    return size(input_size[1:]) if callable(size) else None


def _per_channel(values: tuple[float, ...] | None, chans: int) -> tuple[float, ...] | None:
    """Registered per-channel ``values`` for ``chans`` channels: one value for all is repeated; values
    that differ per channel fit no other channel count (``None``: the training dataset's statistics)."""
    if values is None or len(values) == chans:
        return values
    return (values[0],) * chans if len(set(values)) == 1 else None


def default_dataset(num_classes: int, in_chans: int) -> str:
    """The dataset whose statistics a model without weights is fed with: CIFAR (the papers' data),
    CIFAR-100 for 100 classes, CIFAR-10 otherwise, Fashion-MNIST for one input channel."""
    if in_chans == 1:
        return "fashion_mnist"
    return "cifar100" if num_classes == 100 else "cifar10"


def _statistics(info: ModelInfo, cfg: PretrainedCfg | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per input channel: the model's own (``info.mean``), else its weights' dataset,
    else :func:`default_dataset`'s; a channel count the dataset does not have repeats its average."""
    chans = info.input_size[0]
    if info.mean is not None and info.std is not None:
        return tuple(info.mean), tuple(info.std)
    data = DATASETS[cfg.dataset if cfg is not None else default_dataset(info.num_classes, chans)]
    if len(data.mean) == chans:
        return data.mean, data.std
    return (sum(data.mean) / len(data.mean),) * chans, (sum(data.std) / len(data.std),) * chans


def _paper_ids(paper: str) -> tuple[str, ...] | None:
    ids = tuple(dict.fromkeys(f"arXiv:{n}" for n in re.findall(r"arXiv[ :](\d{4}\.\d{4,5})", paper)))
    return ids or None


def _license(text: str) -> str:
    """A licence sentence (``"MIT (Copyright ...)"``) as timm's lower-case identifier (``"mit"``)."""
    first = text.split(" ")[0].strip("(),").lower() if text else ""
    return first or "mit"


def timm_pretrained_cfg(
    info: ModelInfo, cfg: PretrainedCfg | None = None, pool_size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """timm's ``PretrainedCfg.to_dict()`` for a model built as ``info`` says (with weights ``cfg``):
    only keys timm knows, ``None`` values dropped except ``pool_size``/``first_conv``/``classifier``
    (timm's ``filter_pretrained_cfg``). Images reach the model at ``input_size`` uncropped
    (``crop_pct`` 1.0): a 32x32 dataset is not resized."""
    mean, std = _statistics(info, cfg)
    notes = tuple(n for n in (info.notes, cfg.notes if cfg else "") if n)
    out: dict[str, Any] = {
        "file": cfg.file if cfg is not None else None,
        "architecture": info.name,
        "tag": cfg.tag if cfg is not None else None,
        "input_size": tuple(info.input_size),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": tuple(mean),
        "std": tuple(std),
        "num_classes": info.num_classes,
        "pool_size": pool_size,
        "first_conv": info.first_conv or None,
        "classifier": info.classifier or None,
        "license": _license(cfg.licence if cfg is not None else "MIT"),
        "description": info.table_row or None,
        "origin_url": cfg.source if cfg is not None else None,
        "paper_ids": _paper_ids(info.paper),
        "notes": notes or None,
    }
    return {k: v for k, v in out.items() if v is not None or k in ("pool_size", "first_conv", "classifier")}


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
