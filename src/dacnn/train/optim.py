"""Optimizer parameter groups over deduplicated parameters.

Walking modules yields a shared tensor once per owner and PyTorch then refuses it ("some parameters
appear in more than one parameter group", ``../shared/reference/PITFALLS.md`` item 9).
:func:`param_groups` walks ``named_parameters()``, which lists each tensor once under its first name,
so a shared kernel gets exactly one decay rule.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["param_groups"]


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    decay_1d: bool = True,
) -> list[dict[str, Any]]:
    """Two groups: decayed tensors and the rest (``weight_decay`` 0), each tensor in exactly one.

    ``decay_1d=True`` (the default, as ``TrainConfig.decay_norm_and_bias``) decays everything (the
    SGD recipes: SE-ResNet, LruNet, DACNN); ``decay_1d=False`` exempts tensors with at most one
    dimension (biases, norm affine parameters) and names ending in ``.bias``: the ConvMixer AdamW
    recipe of kernel sharing (SPEC.md 1.2). Empty groups are dropped.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = not decay_1d and (p.ndim <= 1 or name.endswith(".bias"))
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
