"""The evaluation fast path: a copy of a model with each eval-mode BatchNorm folded into its conv.

In eval mode ``BN(conv(x, W) + b) = conv(x, W * a) + (b - mean) * a + beta`` with
``a = gamma / sqrt(var + eps)``: one pass over the activations instead of two. A shared kernel
followed by per-use BatchNorms gets one folded copy per use, so the copy is for evaluation only (it
is untied; ``docs/reference/PITFALLS.md`` item 5): the model itself is never changed.

Pairs folded: a conv (``nn.Conv2d`` or :class:`~dacnn.shared_kernel.AnchoredConv2d`) directly followed
by a ``BatchNorm2d`` in an ``nn.Sequential`` (data flow guaranteed), and the ``convN``/``bnN``
attribute pairs of the blocks defined in :mod:`dacnn.models` (``bnN(convN(x))`` in each of them;
a test checks the models' outputs). Blocks defined elsewhere keep their attribute pairs (a
pre-activation block applies ``bn1`` before ``conv1``). A module with hooks is left as it is.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dacnn.models.layers import fold_bn
from dacnn.shared_kernel import AnchoredConv2d

__all__ = ["fold_batchnorm"]

_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d | AnchoredConv2d) and type(bn) is nn.BatchNorm2d
            and bn.running_mean is not None and bn.running_var is not None
            and isinstance(conv.padding, tuple) and not _hooked(conv) and not _hooked(bn)
            and getattr(conv, "padding_mode", "zeros") == "zeros")


@torch.no_grad()
def _folded_conv(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Conv2d:
    owner = conv.kernel if isinstance(conv, AnchoredConv2d) else conv
    weight, bias = fold_bn(owner.weight, owner.bias, bn)
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                    device=weight.device, dtype=weight.dtype)
    out.weight.copy_(weight)
    out.bias.copy_(bias)
    if owner.weight.is_contiguous(memory_format=torch.channels_last) and not owner.weight.is_contiguous():
        out.weight.data = out.weight.data.contiguous(memory_format=torch.channels_last)
    return out.requires_grad_(False)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` computing the same function with its BatchNorms folded (see the
    module docstring); ``model`` is not changed. Models without foldable pairs come back as a copy."""
    folded = copy.deepcopy(model).eval()
    for module in list(folded.modules()):
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for a, b in zip(names, names[1:], strict=False):
                conv, bn = module._modules[a], module._modules[b]
                if conv is not None and bn is not None and _foldable(conv, bn):
                    module._modules[a], module._modules[b] = _folded_conv(conv, bn), nn.Identity()
        if not type(module).__module__.startswith("dacnn.models."):
            continue
        for a, b in _PAIRS:
            conv, bn = module._modules.get(a), module._modules.get(b)
            if conv is not None and bn is not None and _foldable(conv, bn):
                module._modules[a], module._modules[b] = _folded_conv(conv, bn), nn.Identity()
    return folded
