"""Parameter and FLOP accounting that knows about shared tensors.

Two parameter figures are reported (``docs/reference/PITFALLS.md`` item 1):

* ``unique``: every parameter tensor counted once (trainable or frozen), what
  ``sum(p.numel() for p in model.parameters())`` gives and what the papers' "# params" means;
* ``per_use``: every use of a shared tensor counted, i.e. the size of the same network with free
  weights (DACNN Table 2, the numbers in parentheses).

Uses are found statically: a tensor owned by a :class:`~dacnn.shared_kernel.SharedKernel` is used once per
:class:`~dacnn.shared_kernel.AnchoredConv2d` that applies it; any other tensor once per name it is registered
under (``Parameter`` aliasing and modules with several parents, the two other mechanisms in SPEC.md).
A module called several times in ``forward`` (LruNet's reference code) cannot be seen statically; pass
``example_input`` to count calls instead.

FLOPs count every use (a shared kernel costs compute each time it is applied) through
``torch.utils.flop_counter.FlopCounterMode``.

For the counters people already use (optional: ``pip install 'dacnn[count]'``):

* thop: ``thop.profile(model, inputs=(x,), custom_ops=dacnn.counting.thop_custom_ops())`` gives the
  unique parameters and the per-use MACs (without the rule thop knows no ``SharedKernel``: it counts
  no MAC of a shared kernel and leaves its parameters out);
* fvcore: ``dacnn.counting.fvcore_flops(model, (x,))`` is fvcore's ``FlopCountAnalysis`` whose
  ``by_module()`` (and so ``fvcore.nn.flop_count_table``) puts each use's FLOPs on the layer that
  applies the kernel, as in the free twin, where plain fvcore books every use on the kernel's owner
  (``kernels.anchor``); its totals and ``parameter_count`` are right either way.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dacnn.shared_kernel import AnchoredConv2d, SharedKernel, anchored_uses

__all__ = ["SharedTensor", "ParamCount", "count_params", "count_flops", "forward_calls", "parameter_uses",
           "thop_custom_ops", "fvcore_flops"]


@dataclass(frozen=True)
class SharedTensor:
    """A tensor applied more than once: its first name, shape, size and number of uses."""

    name: str
    shape: tuple[int, ...]
    numel: int
    uses: int


@dataclass(frozen=True)
class ParamCount:
    """Result of :func:`count_params`."""

    unique: int
    per_use: int
    shared: list[SharedTensor] = field(default_factory=list)

    @property
    def compression(self) -> float:
        """``per_use / unique``: how many times larger the free-weight twin is."""
        return self.per_use / self.unique if self.unique else 1.0


def forward_calls(
    model: nn.Module, example_input: torch.Tensor, select: Callable[[nn.Module], bool]
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every call of a module ``select`` accepts during one forward pass of
    ``example_input``, in call order; run in eval mode under ``no_grad`` (no state changes)."""
    calls: list[tuple[str, nn.Module]] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: calls.append((name, mod)))
               for name, m in model.named_modules() if select(m)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return calls


def _call_counts(model: nn.Module, example_input: torch.Tensor) -> dict[int, int]:
    """``id(module) -> calls`` during one forward pass, for modules that hold parameters directly."""
    calls = forward_calls(model, example_input,
                          lambda m: any(True for _ in m.parameters(recurse=False)))
    return dict(Counter(id(m) for _, m in calls))


def parameter_uses(
    model: nn.Module, example_input: torch.Tensor | None = None
) -> dict[int, tuple[str, nn.Parameter, int]]:
    """``id(param) -> (first name, param, uses)`` for every parameter of ``model``, frozen or not
    (the one definition of "unique parameters": a tensor counts once whether it trains or not).

    Without ``example_input`` uses are counted statically (see the module docstring); with it, as
    the number of calls of the modules that own the tensor during one forward pass (a registered
    tensor never used in forward gets 0 uses).
    """
    kernel_uses = anchored_uses(model)
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    calls = _call_counts(model, example_input) if example_input is not None else None

    result: dict[int, tuple[str, nn.Parameter, int]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in result:
            first, _, n = result[id(p)]
            if calls is None and not isinstance(owners[id(p)][0], SharedKernel):
                result[id(p)] = (first, p, n + 1)  # one more alias = one more use
            continue
        owner_modules = owners[id(p)]
        if calls is not None:
            uses = sum(calls.get(id(m), 0) for m in owner_modules)
        elif isinstance(owner_modules[0], SharedKernel):
            uses = sum(kernel_uses.get(id(m), 0) for m in owner_modules)
        else:
            uses = 1
        result[id(p)] = (name, p, uses)
    return result


def count_params(model: nn.Module, example_input: torch.Tensor | None = None) -> ParamCount:
    """Unique and per-use parameter counts (frozen tensors included) plus the shared tensors."""
    uses = parameter_uses(model, example_input)
    unique = sum(p.numel() for _, p, _ in uses.values())
    per_use = sum(p.numel() * n for _, p, n in uses.values())
    shared = [
        SharedTensor(name, tuple(p.shape), p.numel(), n) for name, p, n in uses.values() if n > 1
    ]
    return ParamCount(unique=unique, per_use=per_use, shared=shared)


def count_flops(
    model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32), *, batch_size: int = 1
) -> int:
    """Forward FLOPs of one batch (default: one image) with every use of a shared kernel counted.

    A multiply-add counts as 2 FLOPs (``FlopCounterMode``'s convention). Only the forward pass is
    counted: FlopCounterMode over-counts the backward of grouped convolutions
    (``docs/reference/PERFORMANCE.md``); a training step is about 3x the forward.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    # The training-mode graph on a copy: it is the network the paper defines (inference-only rewrites,
    # such as LruNet's BN-folded fast path, may trade FLOPs for speed), and the copy keeps BatchNorm
    # statistics untouched. Two images at least, so that training-mode BatchNorm accepts the batch.
    probe = copy.deepcopy(model).train()
    n = max(batch_size, 2)
    x = torch.zeros(n, *input_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe(x)
    return int(counter.get_total_flops()) * batch_size // n


def thop_custom_ops() -> dict[type[nn.Module], Any]:
    """thop's ``custom_ops`` for shared kernels: a :class:`SharedKernel` counts as the convolution it
    is each time a use calls it (thop's own ``count_convNd``), so MACs are per use and its tensor is
    counted once; an :class:`AnchoredConv2d` adds nothing (it owns no tensor, its kernel is counted)."""
    from thop.vision.basic_hooks import count_convNd, zero_ops

    return {SharedKernel: count_convNd, AnchoredConv2d: zero_ops}


def _ancestors(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]


def fvcore_flops(model: nn.Module, inputs: Any) -> Any:
    """fvcore's ``FlopCountAnalysis(model, inputs)`` with ``by_module()`` booking each use's FLOPs on
    the :class:`AnchoredConv2d` that applies the kernel (and its parents), not on the kernel's owner."""
    from fvcore.nn import FlopCountAnalysis

    class SharedKernelFlopCountAnalysis(FlopCountAnalysis):
        def by_module(self) -> Counter[str]:
            if getattr(self, "_by_use", None) is not None:
                return Counter(self._by_use)
            owned = Counter(super().by_module())
            calls = FlopCountAnalysis(self._model, self._inputs).ancestor_mode("caller")
            calls.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            called = calls.by_module()
            owners = {id(m): n for n, m in self._model.named_modules() if isinstance(m, SharedKernel)}
            for use_name, use in self._model.named_modules():
                if isinstance(use, AnchoredConv2d) and id(use.kernel) in owners:
                    flops = called.get(use_name, 0)
                    for name in _ancestors(use_name):
                        owned[name] += flops
                    for name in _ancestors(owners[id(use.kernel)]):
                        owned[name] -= flops
            self._by_use = owned
            return Counter(owned)

    return SharedKernelFlopCountAnalysis(model, inputs)
