"""Small building blocks shared by the model families (torchvision's ``conv3x3`` habit)."""

from __future__ import annotations

from torch import nn

from dacnn.shared_kernel import AnchoredConv2d, SharedKernel

__all__ = ["conv3x3", "conv1x1", "conv_use", "split_evenly", "init_weights"]


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
