"""ConvMixer with inter-layer kernel sharing (Azadbakht et al., arXiv 2210.14151; SPEC.md section 1.1).

ConvMixer-h/d (Trockman and Kolter): a patch-embedding conv, then ``d`` mixer layers, each a
depthwise ``k x k`` conv with a residual connection followed by a pointwise 1x1 conv; every conv is
followed by GELU and then BatchNorm (activation before normalisation), and a global-pool + linear head.

Kernel sharing (paper section 3, "isomorphic layers"): with ``shared=True`` all ``d`` depthwise
convs apply one :class:`~dacnn.shared_kernel.SharedKernel` (weight *and* bias, ``groups=h``) and all ``d``
pointwise convs another; each layer keeps its own two BatchNorms. Patch embedding and head are free.
Counts (CIFAR-10): 1,409,034 free, 107,274 shared (SPEC.md table in 1.1).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from dacnn.errors import ConfigError
from dacnn.models.base import ClassifierMixin, Stage
from dacnn.models.layers import drop_path, drop_path_rates
from dacnn.registry import ModelInfo, build_model_with_cfg, register_model, variant_args
from dacnn.shared_kernel import AnchoredConv2d, SharedKernel

__all__ = ["ConvMixer", "MixerLayer"]

PAPER = "arXiv 2210.14151"


class Residual(nn.Module):
    """``x + fn(x)`` (``drop_path_rate``: the branch dropped per sample in training)."""

    def __init__(self, fn: nn.Module, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.fn = fn
        self.drop_path = drop_path(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.fn(x))


class MixerLayer(nn.Sequential):
    """``x + BN(GELU(dw(x)))`` then ``BN(GELU(pw(.)))``; ``dw``/``pw`` are free convs or shared uses."""

    def __init__(self, depthwise: nn.Module, pointwise: nn.Module, width: int,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__(
            Residual(nn.Sequential(depthwise, nn.GELU(), nn.BatchNorm2d(width)), drop_path_rate),
            pointwise,
            nn.GELU(),
            nn.BatchNorm2d(width),
        )


class ConvMixer(ClassifierMixin, nn.Module):
    """ConvMixer-h/d: width ``width`` (h), ``depth`` (d) layers, depthwise kernel ``kernel_size``,
    patch ``patch_size``.

    ``shared=True`` ties every depthwise conv to one kernel and every pointwise conv to another
    (weights and biases, PyTorch default init as in the reference code). The net is isotropic: its
    feature levels are the patch embedding and each mixer layer, all at one resolution.
    """

    def __init__(
        self,
        width: int = 256,
        depth: int = 16,
        *,
        kernel_size: int = 9,
        patch_size: int = 1,
        shared: bool = False,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        for field, value in (("width", width), ("depth", depth), ("kernel_size", kernel_size),
                             ("patch_size", patch_size)):
            if int(value) < 1:
                raise ConfigError(f"ConvMixer: {field} must be >= 1, got {value}")
        if int(num_classes) < 0:
            raise ConfigError(f"ConvMixer: num_classes must be >= 0 (0: no classifier), got {num_classes}")
        self.width, self.depth, self.shared = width, depth, shared
        self.patch_embed = nn.Sequential(
            nn.Conv2d(in_chans, width, patch_size, stride=patch_size),
            nn.GELU(),
            nn.BatchNorm2d(width),
        )
        self.kernels = nn.ModuleDict({
            "depthwise": SharedKernel(width, width, kernel_size, groups=width, bias=True, init="default"),
            "pointwise": SharedKernel(width, width, 1, bias=True, init="default"),
        } if shared else {})

        def depthwise() -> nn.Module:
            if shared:
                return AnchoredConv2d(self.kernels["depthwise"], padding="same")
            return nn.Conv2d(width, width, kernel_size, groups=width, padding="same")

        def pointwise() -> nn.Module:
            if shared:
                return AnchoredConv2d(self.kernels["pointwise"], padding=0)
            return nn.Conv2d(width, width, 1)

        rates = drop_path_rates(drop_path_rate, depth)
        self.layers = nn.Sequential(*(MixerLayer(depthwise(), pointwise(), width, r) for r in rates))
        self.feature_info = [dict(num_chs=width, reduction=patch_size, module="patch_embed")] + [
            dict(num_chs=width, reduction=patch_size, module=f"layers.{i}") for i in range(depth)]
        self._set_head(width, num_classes, global_pool, drop_rate)

    # names before 2026-12 (still loaded): depthwise_kernel, pointwise_kernel, head
    legacy_keys = ((r"^(depthwise|pointwise)_kernel\.", r"kernels.\1."), (r"^head\.", "fc."))

    def _stages(self) -> list[Stage]:
        return [self.patch_embed, *self.layers]

    def _group_patterns(self, coarse: bool) -> tuple[str, str]:
        return r"^patch_embed\.", r"^layers\.(\d+)\."


# name -> builder kwargs (SPEC 1.1: ConvMixer-256/16, kernel 9, patch 1) and free-weight twin.
_CFGS: dict[str, tuple[dict[str, Any], str | None]] = {
    "convmixer_256_16": ({"width": 256, "depth": 16, "kernel_size": 9, "patch_size": 1}, None),
    "convmixer_256_16_shared": (
        {"width": 256, "depth": 16, "kernel_size": 9, "patch_size": 1, "shared": True}, "convmixer_256_16"),
}


def _build(variant: str, /, **kwargs: Any) -> ConvMixer:
    return ConvMixer(**variant_args(variant, _CFGS[variant][0], kwargs))


def _create_convmixer(variant: str, pretrained: bool = False, **kwargs: Any) -> ConvMixer:
    """Build ``variant`` of :data:`_CFGS` with ``kwargs`` (classes, input channels...)."""
    return build_model_with_cfg(partial(_build, variant), variant, pretrained, **kwargs)


default_cfgs: dict[str, ModelInfo] = {
    name: ModelInfo(
        name, "convmixer", num_classes=10, paper=PAPER, shared_twin=twin,
        table_row="SPEC 1.1: ConvMixer-256/16, kernel 9, patch 1",
        notes="CIFAR-10 by default (num_classes=100 for CIFAR-100)", first_conv="patch_embed.0",
        classifier="fc",
    )
    for name, (_, twin) in _CFGS.items()
}


@register_model
def convmixer_256_16(pretrained: bool = False, **kwargs: Any) -> ConvMixer:
    """ConvMixer-256/16 (kernel 9, patch 1), every conv free."""
    return _create_convmixer("convmixer_256_16", pretrained, **kwargs)


@register_model
def convmixer_256_16_shared(pretrained: bool = False, **kwargs: Any) -> ConvMixer:
    """ConvMixer-256/16 with one depthwise and one pointwise kernel shared by all 16 layers."""
    return _create_convmixer("convmixer_256_16_shared", pretrained, **kwargs)
