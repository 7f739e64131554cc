"""The weight-sharing core: one kernel, many uses.

DACNN (arXiv 1904.09764) eq. 3 and 6 apply one global convolution weight ``W_G^conv`` at every
layer ``l >= 2`` while each layer keeps its own BatchNorm ``W_l^bn``. Here that is two modules:

* :class:`SharedKernel` *owns* the tensor (one ``nn.Parameter``, plus an optional bias) and knows
  how many layers use it;
* :class:`AnchoredConv2d` is one *use* of it: it holds stride/padding/dilation but no parameter, only a
  plain (unregistered) reference to its kernel.

Because the parameter lives in exactly one module, ``parameters()``, ``named_parameters()`` and
``state_dict()`` all list it once, so ``safetensors.torch.save_file`` works, optimizers and EMA see one
tensor, and DDP reduces it once. Because uses point at the owning *module* rather than at the tensor,
tying survives ``load_state_dict(assign=True)``, ``to_empty()`` and ``copy.deepcopy``: whatever tensor
the owner holds is what every use applies (see ``docs/reference/PITFALLS.md`` items 2, 3, 8).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SharedKernel", "AnchoredConv2d", "iter_shared_kernels", "anchored_uses"]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


class SharedKernel(nn.Module):
    """Owner of one convolution weight ``(out, in/groups, k, k)`` applied by many layers.

    Calling the module convolves with the kernel; :class:`AnchoredConv2d` does that for each use,
    so forward hooks on a ``SharedKernel`` fire once per use. The kernel keeps no count of its uses:
    they are the ``AnchoredConv2d`` in the module tree (:func:`anchored_uses`), the one source that
    counting, export and :func:`dacnn.untie` read.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        *,
        groups: int = 1,
        bias: bool = False,
        init: str = "kaiming_normal",
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"SharedKernel: in_channels={in_channels} and out_channels={out_channels} "
                f"must both be divisible by groups={groups}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.groups = groups
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``init``: ``"kaiming_normal"`` (fan_out, as torchvision ResNets), ``"kaiming_normal_fan_in"``
        (``nn.init.kaiming_normal_``'s default, the SE-ResNet reference) or ``"default"`` (PyTorch's
        Conv2d init). Model families re-initialise a kernel through this method only."""
        if self.init == "kaiming_normal":
            nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        elif self.init == "kaiming_normal_fan_in":
            nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
        elif self.init == "default":
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        else:
            raise ValueError(f"SharedKernel: unknown init {self.init!r}")
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self,
        x: torch.Tensor,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (1, 1),
        dilation: tuple[int, int] = (1, 1),
    ) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, stride, padding, dilation, self.groups)

    def extra_repr(self) -> str:
        k = "x".join(map(str, self.kernel_size))
        return (
            f"{self.in_channels}, {self.out_channels}, kernel={k}, groups={self.groups}, "
            f"bias={self.bias is not None}"
        )


class AnchoredConv2d(nn.Module):
    """One use of a :class:`SharedKernel` (paper eq. 3): ``conv(x, W_G)``; owns no parameter.

    The kernel is kept in ``__dict__`` (not ``_modules``) so the kernel's tensors are registered,
    saved and counted only under their owner.
    """

    def __init__(
        self,
        kernel: SharedKernel,
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str | None = None,
        dilation: int | tuple[int, int] = 1,
    ) -> None:
        super().__init__()
        if not isinstance(kernel, SharedKernel):
            raise TypeError(f"AnchoredConv2d needs a SharedKernel, got {type(kernel).__name__}")
        object.__setattr__(self, "kernel", kernel)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        if padding is None:  # "same" for odd kernels
            padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel.kernel_size, self.dilation))
        self.padding = padding if isinstance(padding, str) else _pair(padding)

    # conv-like attributes so generic code (reports, untie) can read the geometry
    @property
    def in_channels(self) -> int:
        return self.kernel.in_channels

    @property
    def out_channels(self) -> int:
        return self.kernel.out_channels

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.kernel.kernel_size

    @property
    def groups(self) -> int:
        return self.kernel.groups

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in ("weight", "bias"):
                raise
            raise AttributeError(
                f"AnchoredConv2d has no {name!r}: it applies a shared kernel ({name} is "
                f"`.kernel.{name}`, one tensor for all its uses); call dacnn.untie(model) first to get "
                f"free nn.Conv2d layers back (e.g. before re-parameterising or folding BatchNorm)"
            ) from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return f"anchored to {self.kernel.extra_repr()}, stride={self.stride}, padding={self.padding}"


def iter_shared_kernels(model: nn.Module) -> Iterator[tuple[str, SharedKernel]]:
    """Every distinct :class:`SharedKernel` owned by ``model``, with its qualified name."""
    yield from ((n, m) for n, m in model.named_modules() if isinstance(m, SharedKernel))


def anchored_uses(model: nn.Module) -> dict[int, int]:
    """Map ``id(kernel)`` to the number of :class:`AnchoredConv2d` in ``model`` that apply it."""
    uses: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, AnchoredConv2d):
            uses[id(module.kernel)] = uses.get(id(module.kernel), 0) + 1
    return uses
