"""SE-ResNet for CIFAR with per-stage kernel sharing (Azadbakht et al., arXiv 2210.14151; SPEC.md 1.3).

A 16-wide 3x3 stem, three stages of ``n`` post-activation squeeze-and-excitation basic blocks at
64/128/256 channels (strides 1, 2, 2), global pooling and a linear head. Every stage's first block
projects its shortcut (1x1 conv + BN) because the stem is narrower than stage 1.

Kernel sharing: in a shared stage one ``C x C`` 3x3 :class:`~dacnn.shared_kernel.SharedKernel` is applied
by the second conv of every block and by the first conv of every block whose input already has ``C``
channels, i.e. ``2n - 1`` times; the first block's first conv (``Cin -> C``, maybe strided), the
projections, SE layers and all BatchNorms stay free. ``share_stages`` switches stages one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from dacnn.errors import ConfigError
from dacnn.models.base import ClassifierMixin, Stage
from dacnn.models.layers import BasicBlock, conv3x3, drop_path_rates
from dacnn.registry import ModelInfo, build_model_with_cfg, register_model, variant_args
from dacnn.shared_kernel import AnchoredConv2d, SharedKernel

__all__ = ["SqueezeExcitation", "SEBasicBlock", "SEResNet", "se_resnet"]

PAPER = "arXiv 2210.14151"
STAGE_WIDTHS = (64, 128, 256)
STEM_WIDTH = 16


class SqueezeExcitation(nn.Module):
    """Hu et al.'s SE gate: ``x * sigmoid(W2 relu(W1 avgpool(x)))``, bias-free linears, ratio ``r``."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc(x.mean((2, 3)))
        return x * scale[:, :, None, None]


class SEBasicBlock(BasicBlock):
    """``relu(SE(BN(conv2(relu(BN(conv1(x)))))) + shortcut(x))``; convs are free or shared uses."""

    def __init__(
        self, conv1: nn.Module, conv2: nn.Module, cin: int, cout: int, stride: int, reduction: int,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__(cin, cout, stride, conv1=conv1, conv2=conv2, drop_path_rate=drop_path_rate)
        self.se = SqueezeExcitation(cout, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(self.drop_path(out) + self.shortcut(x))


class SEResNet(ClassifierMixin, nn.Module):
    """CIFAR SE-ResNet with ``blocks`` blocks per stage; ``share_stages[s]`` ties stage ``s``'s 3x3 convs.

    ``width`` is the first stage's channels (the reference's 64: stages 64-128-256; a smaller width
    scales all three, e.g. 16-32-64 for a CPU-sized run); the 16-channel stem is the reference's.

    Shared kernels live in ``self.kernels`` (a ModuleDict keyed by stage index), so each is saved
    and counted once.
    """

    def __init__(
        self,
        blocks: int = 2,
        *,
        width: int = STAGE_WIDTHS[0],
        share_stages: Sequence[bool] | bool = False,
        reduction: int = 16,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if blocks < 1:
            raise ConfigError(f"SEResNet: blocks per stage must be >= 1, got {blocks}")
        if width < reduction:
            raise ConfigError(f"SEResNet: width must be >= the SE reduction {reduction}, got {width}")
        widths = tuple(width * c // STAGE_WIDTHS[0] for c in STAGE_WIDTHS)
        if isinstance(share_stages, bool):
            share_stages = (share_stages,) * len(STAGE_WIDTHS)
        share_stages = tuple(bool(s) for s in share_stages)
        if len(share_stages) != len(STAGE_WIDTHS):
            raise ConfigError(f"SEResNet: share_stages needs {len(STAGE_WIDTHS)} flags, got {share_stages}")
        self.share_stages = share_stages
        self.stem = nn.Sequential(
            conv3x3(in_chans, STEM_WIDTH), nn.BatchNorm2d(STEM_WIDTH), nn.ReLU(inplace=True)
        )
        self.kernels = nn.ModuleDict(
            {str(s): SharedKernel(c, c, 3, init="kaiming_normal_fan_in")
             for s, (c, share) in enumerate(zip(widths, share_stages)) if share}
        )
        stages: list[nn.Module] = []
        cin = STEM_WIDTH
        rates = iter(drop_path_rates(drop_path_rate, blocks * len(widths)))
        self.feature_info = [dict(num_chs=STEM_WIDTH, reduction=1, module="stem")]
        for s, cout in enumerate(widths):
            kernel = self.kernels[str(s)] if share_stages[s] else None
            stage = []
            for b in range(blocks):
                stride = 2 if (s > 0 and b == 0) else 1
                free_conv1 = kernel is None or cin != cout or stride != 1
                conv1 = conv3x3(cin, cout, stride) if free_conv1 else AnchoredConv2d(kernel, padding=1)
                conv2 = conv3x3(cout, cout) if kernel is None else AnchoredConv2d(kernel, padding=1)
                stage.append(SEBasicBlock(conv1, conv2, cin, cout, stride, reduction, next(rates)))
                cin = cout
            stages.append(nn.Sequential(*stage))
            self.feature_info.append(dict(num_chs=cout, reduction=2**s, module=f"stages.{s}"))
        self.stages = nn.Sequential(*stages)
        self._set_head(cin, num_classes, global_pool, drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal convs (fan_in, as the reference), BN 1/0, PyTorch default Linear."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, SharedKernel):
                m.reset_parameters()  # built with init="kaiming_normal_fan_in": the same draw
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stages(self) -> list[Stage]:
        return [self.stem, *self.stages]

    def _group_patterns(self, coarse: bool) -> tuple[str, str]:
        return r"^stem\.", (r"^stages\.(\d+)\." if coarse else r"^stages\.(\d+)\.(\d+)\.")


def se_resnet(blocks: int = 2, *, shared: bool = False, **kw: object) -> nn.Module:
    """SE-ResNet with ``blocks`` per stage; ``shared=True`` shares all three stages (unless
    ``share_stages`` is given)."""
    share_stages = kw.pop("share_stages", shared)
    return SEResNet(blocks, share_stages=share_stages, **kw)  # type: ignore[arg-type]


_DEPTHS = (2, 3, 4, 6, 8, 10)  # blocks per stage of the registered variants (SPEC 1.3)


def _build(variant: str, /, **kwargs: Any) -> nn.Module:
    blocks, shared = _CFGS[variant]
    return se_resnet(**variant_args(variant, {"blocks": blocks, "shared": shared}, kwargs))


def _create_se_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``se_resnet_d_<blocks>`` (``_shared``: every stage shares one kernel) with ``kwargs``."""
    return build_model_with_cfg(partial(_build, variant), variant, pretrained, **kwargs)


# name -> (blocks per stage, all stages shared)
_CFGS: dict[str, tuple[int, bool]] = {
    f"se_resnet_d_{b}" + ("_shared" if shared else ""): (b, shared)
    for b in _DEPTHS for shared in (False, True)
}
default_cfgs: dict[str, ModelInfo] = {
    name: ModelInfo(
        name, "se_resnet", num_classes=10, paper=PAPER,
        table_row=f"SPEC 1.3: se_resnet_d_{b}" + (" (all stages shared)" if shared else " (free)"),
        shared_twin=f"se_resnet_d_{b}" if shared else None,
        notes="CIFAR-10 by default (num_classes=100 for CIFAR-100)",
        extra={"blocks": b}, first_conv="stem.0", classifier="fc",
    )
    for name, (b, shared) in _CFGS.items()
}


@register_model
def se_resnet_d_2(pretrained: bool = False, **kwargs: Any) -> SEResNet:
    """SE-ResNet with 2 blocks per stage, every conv free."""
    return _create_se_resnet("se_resnet_d_2", pretrained, **kwargs)


@register_model
def se_resnet_d_2_shared(pretrained: bool = False, **kwargs: Any) -> SEResNet:
    """SE-ResNet with 2 blocks per stage, one shared 3x3 kernel per stage."""
    return _create_se_resnet("se_resnet_d_2_shared", pretrained, **kwargs)


@register_model
def se_resnet_d_3(pretrained: bool = False, **kwargs: Any) -> SEResNet:
    """SE-ResNet with 3 blocks per stage, every conv free."""
    return _create_se_resnet("se_resnet_d_3", pretrained, **kwargs)


@register_model
def se_resnet_d_3_shared(pretrained: bool = False, **kwargs: Any) -> SEResNet:
    """SE-ResNet with 3 blocks per stage, one shared 3x3 kernel per stage."""
    return _create_se_resnet("se_resnet_d_3_shared", pretrained, **kwargs)


@register_model
def se_resnet_d_4(pretrained: bool = False, **kwargs: Any) -> SEResNet:
    """SE-ResNet with 4 blocks per stage, every conv free."""
    return _create_se_resnet("se_resnet_d_4", pretrained, **kwargs)


@register_model
def se_resnet_d_4_shared(pretrained: bool = False, **kwargs: Any) -> SEResNet:
    """SE-ResNet with 4 blocks per stage, one shared 3x3 kernel per stage."""
    return _create_se_resnet("se_resnet_d_4_shared", pretrained, **kwargs)


@register_model
def se_resnet_d_6(pretrained: bool = False, **kwargs: Any) -> SEResNet:
    """SE-ResNet with 6 blocks per stage, every conv free."""
    return _create_se_resnet("se_resnet_d_6", pretrained, **kwargs)


@register_model
def se_resnet_d_6_shared(pretrained: bool = False, **kwargs: Any) -> SEResNet:
    """SE-ResNet with 6 blocks per stage, one shared 3x3 kernel per stage."""
    return _create_se_resnet("se_resnet_d_6_shared", pretrained, **kwargs)


@register_model
def se_resnet_d_8(pretrained: bool = False, **kwargs: Any) -> SEResNet:
    """SE-ResNet with 8 blocks per stage, every conv free."""
    return _create_se_resnet("se_resnet_d_8", pretrained, **kwargs)


@register_model
def se_resnet_d_8_shared(pretrained: bool = False, **kwargs: Any) -> SEResNet:
    """SE-ResNet with 8 blocks per stage, one shared 3x3 kernel per stage."""
    return _create_se_resnet("se_resnet_d_8_shared", pretrained, **kwargs)


@register_model
def se_resnet_d_10(pretrained: bool = False, **kwargs: Any) -> SEResNet:
    """SE-ResNet with 10 blocks per stage, every conv free."""
    return _create_se_resnet("se_resnet_d_10", pretrained, **kwargs)


@register_model
def se_resnet_d_10_shared(pretrained: bool = False, **kwargs: Any) -> SEResNet:
    """SE-ResNet with 10 blocks per stage, one shared 3x3 kernel per stage."""
    return _create_se_resnet("se_resnet_d_10_shared", pretrained, **kwargs)
