"""Optimizer parameter groups over deduplicated parameters.

Walking modules yields a shared tensor once per owner and PyTorch then refuses it ("some parameters
appear in more than one parameter group", ``docs/reference/PITFALLS.md`` item 9).
:func:`param_groups` walks ``named_parameters()``, which lists each tensor once under its first name,
so a shared kernel gets exactly one decay rule.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["param_groups"]


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def is_norm_bias(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` is the bias (shift) of a normalisation layer."""
    owner, _, leaf = name.rpartition(".")
    return leaf == "bias" and isinstance(model.get_submodule(owner), NORM_LAYERS)


def freeze_norm_scales(model: nn.Module) -> int:
    """Keep every normalisation layer's scale at its value (1 at init): airbench's BatchNorm without a
    learned affine weight. Returns the number of tensors frozen."""
    frozen = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, NORM_LAYERS) and isinstance(weight, nn.Parameter) and weight.requires_grad:
            weight.requires_grad_(False)
            frozen += 1
    return frozen


def set_bn_momentum(model: nn.Module, momentum: float) -> int:
    """Set the running-statistics momentum of every BatchNorm (airbench: 0.4); returns how many."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in layers:
        m.momentum = momentum
    return len(layers)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    decay_1d: bool = True,
    norm_bias_lr_scale: float = 1.0,
    decoupled_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Two groups: decayed tensors and the rest (``weight_decay`` 0), each tensor in exactly one.

    ``decay_1d=True`` (the default, as ``TrainConfig.decay_norm_and_bias``) decays everything (the
    SGD recipes: SE-ResNet, LruNet, DACNN); ``decay_1d=False`` exempts tensors with at most one
    dimension (biases, norm affine parameters) and names ending in ``.bias``: the ConvMixer AdamW
    recipe of kernel sharing (SPEC.md 1.2). Empty groups are dropped.

    ``norm_bias_lr_scale`` puts normalisation biases in groups of their own whose ``lr_scale``
    multiplies the learning rate (airbench: 64). With ``decoupled_lr`` (the base learning rate) a
    group's ``weight_decay`` is ``weight_decay / (decoupled_lr * lr_scale)``, so each step removes
    ``weight_decay`` x the schedule factor of every weight whatever its group's learning rate
    (airbench's decoupled form).
    """
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    scaled = norm_bias_lr_scale != 1.0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = not decay_1d and (p.ndim <= 1 or name.endswith(".bias"))
        buckets.setdefault((not exempt, scaled and is_norm_bias(model, name)), []).append(p)
    groups = []
    for (decayed, norm_bias) in ((True, False), (False, False), (True, True), (False, True)):
        params = buckets.get((decayed, norm_bias))
        if not params:
            continue
        scale = norm_bias_lr_scale if norm_bias else 1.0
        wd = weight_decay if decayed else 0.0
        if decoupled_lr is not None:
            wd = wd / (decoupled_lr * scale)
        groups.append({"params": params, "weight_decay": wd, "lr_scale": scale})
    return groups
