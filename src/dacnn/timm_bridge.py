"""dacnn's models in timm's registry: ``dacnn.timm_bridge.register()``, then ``timm.create_model`` and
timm's ``train.py`` build and train them (``scripts/timm-train`` registers, then runs train.py).

Every registered dacnn model ``<name>`` becomes timm model ``dacnn_<name>`` (:data:`PREFIX`): dacnn's
``resnet18`` is a CIFAR net, timm's an ImageNet one, so no timm name is shadowed; each pretrained tag
``<name>.<tag>`` becomes ``dacnn_<name>.<tag>`` (``timm.list_pretrained("dacnn_*")`` lists them). A timm
entrypoint builds through :func:`dacnn.create_model`, so timm's keyword arguments (``num_classes``,
``in_chans``, ``drop_rate``, ``drop_path_rate``, ``global_pool``, ``features_only``, ``out_indices``)
mean what they mean there, and ``model.pretrained_cfg`` gives timm's data pipeline the model's
32x32 input and statistics (``timm.data.resolve_model_data_config``). A ``pretrained_cfg`` naming a
Hub repository (``timm.create_model("hf-hub:org/name", pretrained=True)`` on a folder written by
:func:`dacnn.hf_hub.save_pretrained`) loads through :func:`dacnn.from_pretrained`.

timm is an optional, outside dependency (it needs a torchvision that imports beside this torch):
nothing in dacnn imports it but :func:`register`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from torch import nn

from dacnn.hf_hub import PREFIX, from_pretrained, hub_name
from dacnn.registry import (
    PretrainedCfg,
    create_model,
    list_models,
    list_pretrained,
    model_info,
    pretrained_cfg,
    split_tag,
)
from dacnn.registry import timm_pretrained_cfg as _cfg

__all__ = ["register", "PREFIX", "timm_name"]

default_cfgs: Any = {}  # timm's register_model reads the entrypoint module's table


def timm_name(name: str) -> str:
    """The timm name of dacnn model (or ``model.tag``) ``name``."""
    return hub_name(name)


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None,
                   cache_dir: Any = None, pretrained_model_args: Any = None, **kwargs: Any) -> nn.Module:
        # ``pretrained_model_args``: a Hub config's saved ``model_args``, which newer timm (1.0.31; not
        # 1.0.28) passes beside the same arguments merged into ``kwargs``; timm's builder keeps it on the
        # model as a record, never a constructor argument, and so does this one
        cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else pretrained_cfg
        tag = cfg if isinstance(cfg, str) else (cfg or {}).get("tag")
        hub_id = (cfg or {}).get("hf_hub_id") if isinstance(cfg, dict) else None
        if pretrained and hub_id:
            model = from_pretrained(f"hf-hub:{hub_id}", cache_dir=cache_dir, **kwargs)
        else:
            model = create_model(f"{name}.{tag}" if tag else name, pretrained=pretrained, **kwargs)
        model.pretrained_cfg = {**model.pretrained_cfg, **(pretrained_cfg_overlay or {}),
                                "architecture": timm_name(name)}
        model.default_cfg = model.pretrained_cfg
        model.pretrained_model_args = dict(pretrained_model_args or {})
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = timm_name(name)
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"dacnn's ``{name}`` ({model_info(name).table_row or model_info(name).paper})."
    return entrypoint


def _tag_cfg(name: str, weights: PretrainedCfg) -> dict[str, Any]:
    """timm's cfg of released weights: the input they were evaluated at, and how it is normalised."""
    info = model_info(name)
    chans = weights.model_kwargs.get("in_chans", info.input_size[0])
    raw = None if weights.normalize else (0.0,) * chans  # the release feeds pixels / 255
    classes = weights.model_kwargs.get("num_classes", info.num_classes)
    info = replace(info, input_size=(chans, *(weights.input_size or info.input_size)[1:]), mean=raw,
                   std=raw and (1.0,) * chans, num_classes=classes)
    return {**_cfg(info, weights), "architecture": timm_name(name)}


def register(prefix: str = PREFIX) -> list[str]:
    """Register every dacnn model (and pretrained tag) in timm's registry as ``<prefix><name>``;
    returns the names added (none on a second call). ``ImportError`` where timm does not import."""
    if prefix != PREFIX:
        raise ValueError(f"the bridge's prefix is {PREFIX!r} (hub configs name it), got {prefix!r}")
    import timm.models as timm_models  # the outside dependency, on demand

    module = sys.modules[__name__]
    added = [n for n in list_models() if not timm_models.is_model(timm_name(n))]
    table: dict[str, dict[str, Any]] = {}
    for name in added:
        table[timm_name(name)] = {**_cfg(model_info(name)), "architecture": timm_name(name)}
        for full in list_pretrained(f"{name}.*"):
            table[f"{timm_name(name)}.{split_tag(full)[1]}"] = _tag_cfg(name, pretrained_cfg(full))
    module.default_cfgs = timm_models.generate_default_cfgs(table)
    for name in added:
        timm_models.register_model(_entrypoint(name))
    return [timm_name(n) for n in added]
