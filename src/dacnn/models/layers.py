"""Small building blocks shared by the model families (torchvision's ``conv3x3`` habit; timm's
``SelectAdaptivePool2d`` pool types and ``DropPath``), the one residual block and the one
BatchNorm-folding rule."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dacnn.shared_kernel import AnchoredConv2d, SharedKernel

__all__ = ["conv3x3", "conv1x1", "conv_use", "split_evenly", "init_weights", "make_pool", "pooled_features",
           "DropPath", "drop_path_rates", "Regulator", "BasicBlock", "fold_bn"]


def conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


def conv1x1(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=bias)


def conv_use(kernel: SharedKernel | None, cin: int, cout: int, *, bias: bool = False) -> nn.Module:
    """One application of ``kernel`` (an :class:`AnchoredConv2d`), or a free 3x3 conv if ``None``.

    The free branch builds the "free weights" twin of a shared network (DACNN Table 2, in
    parentheses): same geometry, one tensor per use.
    """
    if kernel is None:
        return conv3x3(cin, cout, bias=bias)
    return AnchoredConv2d(kernel, padding=1)


def split_evenly(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` sizes differing by at most one, smaller first.

    13 convolutions in 5 pooling groups give VGG-16's layout (2, 2, 3, 3, 3).
    """
    base, extra = divmod(total, parts)
    return [base] * (parts - extra) + [base + 1] * extra


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convolutions, BN weight 1 / bias 0, as torchvision's ResNet."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, SharedKernel):
            m.reset_parameters()


class AvgMaxPool(nn.Module):
    """timm's ``avgmax`` (mean of global average and max) or, with ``cat``, ``catavgmax`` (both,
    concatenated: twice the channels)."""

    def __init__(self, cat: bool = False) -> None:
        super().__init__()
        self.cat = cat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg, peak = x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
        return torch.cat((avg, peak), 1) if self.cat else 0.5 * (avg + peak)


def make_pool(kind: str) -> nn.Module:
    """Global pooling of timm's type ``kind``: ``"avg"``, ``"max"``, ``"avgmax"``, ``"catavgmax"``, or
    ``""`` (none: ``nn.Identity``). Maps keep their two spatial dims (``1 x 1``)."""
    pools = {"avg": lambda: nn.AdaptiveAvgPool2d(1), "max": lambda: nn.AdaptiveMaxPool2d(1),
             "avgmax": lambda: AvgMaxPool(), "catavgmax": lambda: AvgMaxPool(cat=True), "": nn.Identity}
    if kind not in pools:
        raise ValueError(f"global_pool must be one of {', '.join(map(repr, pools))}, got {kind!r}")
    return pools[kind]()


def pooled_features(channels: int, kind: str) -> int:
    """Features a classifier reads after pool ``kind`` over ``channels`` channels."""
    return 2 * channels if kind == "catavgmax" else channels


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., arXiv 1603.09382; timm's ``DropPath``): in training, zero a
    residual branch per sample with probability ``p`` and scale the kept ones by ``1 / (1 - p)``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path_rates(rate: float, blocks: int) -> list[float]:
    """Per-block drop-path probabilities rising linearly from 0 to ``rate`` (timm's ResNet rule)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    return [rate * i / max(blocks - 1, 1) for i in range(blocks)]


def drop_path(p: float) -> nn.Module:
    """``DropPath(p)``, or ``nn.Identity`` for ``p == 0`` (the block's forward is then unchanged)."""
    return DropPath(p) if p > 0 else nn.Identity()


class Regulator(nn.Sequential):
    """Free 1x1 conv + BN + ReLU appended to a residual block (DACNN, arXiv 1904.09764, Figure 3
    right)."""

    def __init__(self, channels: int) -> None:
        super().__init__(conv1x1(channels, channels), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """The residual basic block (He et al., arXiv 1512.03385; DACNN eq. 6):
    ``relu(drop_path(norm2(conv2(relu(norm1(conv1(x)))))) + shortcut(x))``, then an optional
    :class:`Regulator`.

    ``conv1``/``conv2`` replace the default free 3x3 convs (uses of a shared kernel, a free
    transition conv); ``shortcut`` replaces the default (identity, or a 1x1 projection + norm when
    ``stride != 1`` or ``cin != cout``); ``norm_layer`` builds the two norms (``nn.Identity`` for a
    net without BatchNorm); ``drop_path_rate`` drops the residual branch per sample in training
    (stochastic depth).
    """

    expansion = 1

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int = 1,
        *,
        conv1: nn.Module | None = None,
        conv2: nn.Module | None = None,
        shortcut: nn.Module | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        regulator: bool = False,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride) if conv1 is None else conv1
        self.bn1 = norm_layer(cout)
        self.conv2 = conv3x3(cout, cout) if conv2 is None else conv2
        self.bn2 = norm_layer(cout)
        self.relu = nn.ReLU(inplace=True)
        if shortcut is None and (stride != 1 or cin != cout):
            shortcut = nn.Sequential(conv1x1(cin, cout, stride), norm_layer(cout))
        self.shortcut = nn.Identity() if shortcut is None else shortcut
        self.regulator = Regulator(cout) if regulator else None
        self.drop_path = drop_path(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.drop_path(self.bn2(self.conv2(out))) + self.shortcut(x))
        return self.regulator(out) if self.regulator is not None else out


def fold_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode ``BN(conv(x, W, b))`` as one conv ``(W * a, (b - mean) * a + beta)`` with
    ``a = gamma / sqrt(var + eps)`` (Ioffe & Szegedy, arXiv 1502.03167, Algorithm 2); ``gamma``
    and ``beta`` default to 1 and 0 for a BatchNorm without affine parameters. Differentiable."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = bn.bias + shift
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.view(-1, *([1] * (weight.ndim - 1))), shift
