"""Optimizer parameter groups over deduplicated parameters.

Walking modules yields a shared tensor once per owner and PyTorch then refuses it ("some parameters
appear in more than one parameter group", ``docs/reference/PITFALLS.md`` item 9).
:func:`param_groups` walks ``named_parameters()``, which lists each tensor once under its first name,
so a shared kernel gets exactly one decay rule.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from dacnn.counting import forward_calls
from dacnn.shared_kernel import AnchoredConv2d

__all__ = ["param_groups", "freeze_norm_scales", "thaw_norm_scales", "norms_after_shared_kernels",
           "set_bn_momentum"]


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


def thaw_norm_scales(model: nn.Module, names: Collection[str]) -> int:
    """Let the normalisation layers ``names`` learn their scale again (after :func:`freeze_norm_scales`,
    or in a model that builds them frozen, such as airbench's); returns how many were frozen."""
    thawed = 0
    for name in names:
        weight = getattr(model.get_submodule(name), "weight", None)
        if isinstance(weight, nn.Parameter) and not weight.requires_grad:
            weight.requires_grad_(True)
            thawed += 1
    return thawed


def norms_after_shared_kernels(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the normalisation layers whose input comes from a use of a shared kernel: the last
    convolution or linear layer run before them (pooling and activations may lie between) is a
    :class:`~dacnn.shared_kernel.AnchoredConv2d` or holds a weight tensor another module holds too.
    These are DACNN's free per-layer BatchNorms (arXiv 1904.09764 section 3: what tells the uses of
    one kernel apart). Found by running ``example`` once in eval mode (no state changes)."""
    holders = Counter(id(m.weight) for m in model.modules() if not isinstance(m, NORM_LAYERS)
                      and isinstance(getattr(m, "weight", None), torch.Tensor))

    def weighted(m: nn.Module) -> bool:
        return isinstance(m, (AnchoredConv2d, nn.modules.conv._ConvNd, nn.Linear))

    def shared(m: nn.Module) -> bool:
        return isinstance(m, AnchoredConv2d) or holders[id(m.weight)] > 1

    calls = forward_calls(model, example, lambda m: weighted(m) or isinstance(m, NORM_LAYERS))
    out, last = [], None
    for name, module in calls:
        if isinstance(module, NORM_LAYERS):
            if last is not None and shared(last) and name not in out:
                out.append(name)
        else:
            last = module
    return out


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
