"""Optimizer parameter groups over deduplicated parameters.

Walking modules yields a shared tensor once per owner and PyTorch then refuses it ("some parameters
appear in more than one parameter group", ``../shared/reference/PITFALLS.md`` item 9).
:func:`param_groups` walks ``named_parameters()``, which lists each tensor once under its first name,
so a shared kernel gets exactly one decay rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["param_groups"]


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    decay_1d: bool = False,
    no_decay_names: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Two groups: decayed tensors and the rest (``weight_decay`` 0), each tensor in exactly one.

    By default tensors with at most one dimension (biases, norm affine parameters) and names ending
    in ``.bias`` are not decayed: the ConvMixer recipe of kernel sharing (SPEC.md 1.2).
    ``decay_1d=True`` decays everything (the SE-ResNet and LruNet recipes); ``no_decay_names``
    exempts more names. Empty groups are dropped.
    """
    skip = set(no_decay_names)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = name in skip or (not decay_1d and (p.ndim <= 1 or name.endswith(".bias")))
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
