"""Feature extraction and stage-wise execution in timm's terms (``timm/models/_features.py``,
``_manipulate.py``), for models whose shared kernels must survive both.

* :func:`feature_take_indices`: timm's rule for ``indices`` (``None``: all, an int ``n``: the last
  ``n``, a sequence: those, negative ones counted from the end);
* :class:`FeatureInfo`: ``num_chs`` / ``reduction`` / ``module`` of each feature level, with timm's
  accessors (``channels()``, ``reduction()``, ``module_name()``);
* :class:`FeatureGetterNet`: what ``create_model(..., features_only=True)`` returns, timm's
  ``FeatureGetterNet``: the model pruned past the last level asked for, called through its
  ``forward_intermediates(intermediates_only=True)``. timm's default ``FeatureListNet`` would instead
  re-run the model's top-level children in order, and a ``kernels`` ModuleDict is a child that is not
  a layer, so the getter is the one wrapper that keeps a shared kernel's uses intact;
* :func:`run_stage`: one stage under non-reentrant ``torch.utils.checkpoint`` (reentrant checkpointing
  breaks DDP when one parameter is applied many times: "Expected to mark a variable ready only
  once"), with BatchNorm running statistics updated once per step, not again when the stage is
  recomputed in the backward pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["feature_take_indices", "FeatureInfo", "FeatureGetterNet", "run_stage"]

Indices = int | Sequence[int] | None


def feature_take_indices(num_levels: int, indices: Indices = None) -> tuple[list[int], int]:
    """``(sorted indices to return, largest one)`` of ``num_levels`` feature levels (timm's rule):
    ``None`` all of them, an int ``n`` the last ``n``, a sequence those given (negative from the end).
    An index outside the model's levels is a ``ValueError`` naming how many there are."""
    if indices is None:
        indices = num_levels
    if isinstance(indices, int):
        if not 0 <= indices <= num_levels:
            raise ValueError(f"take the last n of {num_levels} feature levels: n must be in 0..{num_levels}, "
                             f"got {indices}")
        take = list(range(num_levels - indices, num_levels))
    else:
        take = sorted({num_levels + i if i < 0 else i for i in indices})
        bad = [i for i in take if not 0 <= i < num_levels]
        if bad:
            raise ValueError(f"feature indices {list(indices)} out of range for {num_levels} levels "
                             f"(0..{num_levels - 1}, or negative from the end)")
    return take, (max(take) if take else -1)


class FeatureInfo:
    """Feature levels (dicts with ``num_chs``, ``reduction``, ``module``) and the ones returned
    (``out_indices``); the accessors of timm's ``FeatureInfo``."""

    def __init__(self, info: list[dict[str, Any]], out_indices: Sequence[int]) -> None:
        for i, level in enumerate(info):
            if not (level.get("num_chs", 0) > 0 and level.get("reduction", 0) >= 1 and "module" in level):
                raise ValueError(f"feature level {i} needs num_chs > 0, reduction >= 1 and module: {level}")
            level.setdefault("index", i)
        self.info = info
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, int):
            return self.info[idx][key]
        return [self.info[i][key] for i in idx]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: Sequence[int] | None = None) -> list[dict]:
        chosen = self.out_indices if idx is None else idx
        return [dict(self.info[i]) if keys is None else {k: self.info[i][k] for k in keys} for i in chosen]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("module", idx)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)


class FeatureGetterNet(nn.Module):
    """A backbone returning one feature map per level in ``out_indices`` (timm's ``FeatureGetterNet``).

    With ``prune`` the levels after the last one asked for and the head are removed from ``model``
    (:meth:`prune_intermediate_layers`, which also drops a shared kernel none of the kept layers
    applies), so every remaining parameter gets a gradient.
    """

    def __init__(self, model: nn.Module, out_indices: Indices = None, *, norm: bool = False,
                 prune: bool = True, output_fmt: str = "NCHW") -> None:
        super().__init__()
        if output_fmt != "NCHW":
            raise ValueError(f"dacnn feature maps are NCHW, got output_fmt={output_fmt!r}")
        take, _ = feature_take_indices(len(model.feature_info), out_indices)
        if prune:
            take = model.prune_intermediate_layers(take, prune_norm=not norm, prune_head=True)
        self.model = model
        self.out_indices = tuple(take)
        self.norm = norm
        self.feature_info = FeatureInfo(copy.deepcopy(list(model.feature_info)), self.out_indices)
        self.pretrained_cfg = {k: v for k, v in getattr(model, "pretrained_cfg", {}).items()
                               if k not in ("num_classes", "classifier", "global_pool")}
        self.default_cfg = self.pretrained_cfg

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=list(self.out_indices), norm=self.norm,
                                                intermediates_only=True)


def _batchnorms(owner: nn.Module | None) -> list[nn.modules.batchnorm._BatchNorm]:
    modules = owner.modules() if isinstance(owner, nn.Module) else ()
    return [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.training and m.track_running_stats and m.running_mean is not None]


@contextmanager
def _statistics_frozen(bns: list[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """BatchNorm running statistics unchanged through a recomputation: momentum 0 makes the update
    ``running * 1 + batch * 0`` (exact), and the step counter is put back."""
    saved = [(bn.momentum, None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone())
             for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, (momentum, steps) in zip(bns, saved):
            bn.momentum = momentum
            if steps is not None:
                bn.num_batches_tracked.copy_(steps)


def run_stage(stage: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, checkpointed: bool,
              modules: nn.Module | None = None) -> torch.Tensor:
    """``stage(x)``, under non-reentrant activation checkpointing when ``checkpointed`` (and a gradient
    is recorded). The recomputation in the backward pass leaves the running statistics of the
    BatchNorms in ``modules`` (default: ``stage`` itself, if a module; a model's stages pass the
    model) as the first pass set them."""
    if not (checkpointed and torch.is_grad_enabled()):
        return stage(x)
    bns = _batchnorms(modules if modules is not None else stage if isinstance(stage, nn.Module) else None)
    calls = [0]

    def once(inp: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 1:
            return stage(inp)
        with _statistics_frozen(bns):
            return stage(inp)

    return checkpoint(once, x, use_reentrant=False)
