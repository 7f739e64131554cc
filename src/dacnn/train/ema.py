"""Exponential moving average of a model's weights, each shared tensor updated once per step.

Helpers that walk ``state_dict()`` update a tensor once per *alias*: a kernel shared 16 times moves
``1 - d**16`` instead of ``1 - d`` per step (``docs/reference/PITFALLS.md`` item 4, timm's
ModelEma, YOLOv5's ModelEMA). :class:`ModelEMA` walks the deduplicated ``parameters()`` and
``buffers()`` of a deep copy instead, so it agrees with the model tensor for tensor.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEMA", "Lookahead"]


class ModelEMA:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step (:meth:`update`).

    ``module`` is the averaged copy (eval mode, no gradients); float buffers (BatchNorm running
    statistics) are averaged the same way, integer buffers (``num_batches_tracked``) copied.
    ``updates`` counts calls (checkpointed by the trainer).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ema = list(self.module.parameters()) + list(self.module.buffers())
        live = list(model.parameters()) + list(model.buffers())
        if len(ema) != len(live):
            raise ValueError(f"EMA has {len(ema)} tensors, the model {len(live)}: not the same architecture")
        return ema, live

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every distinct tensor of the average one step towards ``model``'s."""
        self.updates += 1
        ema, live = self._pairs(model)
        floats = [(e, t.detach()) for e, t in zip(ema, live) if e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [t for _, t in floats], 1.0 - self.decay)
        for e, t in zip(ema, live):
            if not e.is_floating_point():
                e.copy_(t)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copy ``model``'s tensors into the average (restart it)."""
        for e, t in zip(*self._pairs(model)):
            e.copy_(t)


class Lookahead:
    """airbench's lookahead averaging (arXiv 2404.00498, ``LookaheadState``): every :attr:`EVERY` steps
    ``avg = rho * avg + (1 - rho) * weights`` and the weights are set to ``avg``, with ``rho`` =
    :meth:`decay` growing from 0 to 0.95^5 over training; at each epoch end the model takes the average
    (:meth:`copy_back`). Float parameters and buffers are averaged, each distinct tensor once.

    The average starts as a copy of the model at an epoch boundary (airbench: at the first update of
    epoch 3), so a run resumed from an epoch's checkpoint rebuilds it from the weights alone.
    """

    EVERY = 5

    def __init__(self, model: nn.Module) -> None:
        self.slow = [t.detach().clone() for t in self._live(model)]

    @staticmethod
    def _live(model: nn.Module) -> list[torch.Tensor]:
        return [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]

    @staticmethod
    def decay(step: int, total_steps: int) -> float:
        """``0.95**5 * (step / total_steps)**3``."""
        return 0.95**5 * (step / max(1, total_steps)) ** 3

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        live = [t.detach() for t in self._live(model)]
        torch._foreach_lerp_(self.slow, live, 1.0 - decay)
        torch._foreach_copy_(live, self.slow)

    @torch.no_grad()
    def copy_back(self, model: nn.Module) -> None:
        torch._foreach_copy_([t.detach() for t in self._live(model)], self.slow)
