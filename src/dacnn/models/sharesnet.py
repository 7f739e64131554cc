"""ShaResNet for CIFAR (Boulch, arXiv 1702.08782; SPEC.md section 4).

Two pre-activation families, both three stages (32 -> 16 -> 8) ending in BN-ReLU, global pooling and a
linear layer; convolutions have no bias:

* :class:`PreActResNet` (He et al., "Identity Mappings", depth ``9n + 2``): bottleneck units
  ``1x1 (C/4) -> 3x3 (C/4) -> 1x1 (C)`` at widths 64/128/256 after a 16-wide stem; ResNet-164 is n=18;
* :class:`WideResNet` (Zagoruyko and Komodakis, WRN-d-k, depth ``6n + 4``): basic units of two 3x3
  convs at widths 16k/32k/64k.

The first unit of a stage (``Cin != C``) applies its BN-ReLU to both branches and projects the
shortcut with a free 1x1 conv. ShaResNet's sharing rule: in each stage one 3x3 kernel is applied by
the 3x3 conv (bottleneck) or the *second* 3x3 conv (wide) of units 2..n; the first unit of each
stage stays free. Counts: ResNet-164 1,703,258 -> 929,114; WRN-40-4 8,949,210 -> 5,852,634;
WRN-28-10 (CIFAR-100) 36,536,884 -> 26,860,084 (ShaResNet README table).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from dacnn.errors import ConfigError
from dacnn.models.base import ClassifierMixin, Stage
from dacnn.models.layers import conv1x1, conv3x3, drop_path, drop_path_rates, init_weights
from dacnn.registry import ModelInfo, build_model_with_cfg, register_model, variant_args
from dacnn.shared_kernel import AnchoredConv2d, SharedKernel

__all__ = ["PreActBottleneck", "PreActBasic", "PreActResNet", "WideResNet"]

PAPER = "arXiv 1702.08782"


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class _PreActUnit(nn.Module):
    """Shared skeleton: ``x + branch(preact(x))`` or, for a projecting unit, ``proj(a) + branch(a)``
    with ``a = preact(x)``; ``drop_path`` (stochastic depth) acts on the branch."""

    preact: nn.Module
    shortcut: nn.Module | None
    drop_path: nn.Module

    def branch(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            return x + self.drop_path(self.branch(self.preact(x)))
        a = self.preact(x)
        return self.shortcut(a) + self.drop_path(self.branch(a))


class PreActBottleneck(_PreActUnit):
    """Pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3 (``conv2``, maybe shared), BN-ReLU-1x1."""

    def __init__(self, cin: int, cout: int, stride: int, conv2: nn.Module | None, drop_path_rate: float = 0.0,
                 ) -> None:
        super().__init__()
        mid = cout // 4
        self.preact = _bn_relu(cin)
        self.conv1 = conv1x1(cin, mid, stride)
        self.act1 = _bn_relu(mid)
        self.conv2 = conv2 if conv2 is not None else conv3x3(mid, mid)
        self.act2 = _bn_relu(mid)
        self.conv3 = conv1x1(mid, cout)
        self.shortcut = conv1x1(cin, cout, stride) if (cin != cout or stride != 1) else None
        self.drop_path = drop_path(drop_path_rate)

    def branch(self, a: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act2(self.conv2(self.act1(self.conv1(a)))))


class PreActBasic(_PreActUnit):
    """Wide pre-activation unit: BN-ReLU-3x3 (``conv1``), BN-ReLU-3x3 (``conv2``, maybe shared)."""

    def __init__(self, cin: int, cout: int, stride: int, conv2: nn.Module | None, drop_path_rate: float = 0.0,
                 ) -> None:
        super().__init__()
        self.preact = _bn_relu(cin)
        self.conv1 = conv3x3(cin, cout, stride)
        self.act1 = _bn_relu(cout)
        self.conv2 = conv2 if conv2 is not None else conv3x3(cout, cout)
        self.shortcut = conv1x1(cin, cout, stride) if (cin != cout or stride != 1) else None
        self.drop_path = drop_path(drop_path_rate)

    def branch(self, a: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act1(self.conv1(a)))


class _CifarPreActNet(ClassifierMixin, nn.Module):
    """Stem 3x3 -> three stages of units -> BN-ReLU (``final``, timm's ``norm``) -> global pool -> linear."""

    def __init__(
        self,
        unit: type[_PreActUnit],
        widths: tuple[int, int, int],
        units_per_stage: int,
        shared_width: tuple[int, int, int],
        *,
        shared: bool,
        num_classes: int,
        in_chans: int,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.shared = shared = shared and units_per_stage > 1  # one unit per stage: nothing to share
        self.stem = conv3x3(in_chans, 16)
        self.kernels = nn.ModuleDict(
            {str(s): SharedKernel(c, c, 3) for s, c in enumerate(shared_width)} if shared else {}
        )
        stages, cin = [], 16
        rates = iter(drop_path_rates(drop_path_rate, units_per_stage * len(widths)))
        self.feature_info = [dict(num_chs=16, reduction=1, module="stem")]
        for s, cout in enumerate(widths):
            stride = 1 if s == 0 else 2
            units = [unit(cin, cout, stride, None, next(rates))]
            for _ in range(units_per_stage - 1):
                conv2 = AnchoredConv2d(self.kernels[str(s)], padding=1) if shared else None
                units.append(unit(cout, cout, 1, conv2, next(rates)))
            stages.append(nn.Sequential(*units))
            self.feature_info.append(dict(num_chs=cout, reduction=2**s, module=f"stages.{s}"))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.final = _bn_relu(cin)
        self._set_head(cin, num_classes, global_pool, drop_rate)
        init_weights(self)

    def _stages(self) -> list[Stage]:
        return [self.stem, *self.stages]

    def _final_norm(self) -> nn.Module | None:
        return self.final

    def _prune_final_norm(self) -> None:
        self.final = nn.Identity()

    def _group_patterns(self, coarse: bool) -> tuple[str, str]:
        return r"^stem\.", (r"^stages\.(\d+)\." if coarse else r"^stages\.(\d+)\.(\d+)\.")

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Stem, stages, then the final BN-ReLU after the last block (timm's ResNetV2 rule)."""
        matcher = super().group_matcher(coarse)
        matcher["blocks"].append((r"^final\.", (99999,)))
        return matcher


class PreActResNet(_CifarPreActNet):
    """Pre-activation bottleneck ResNet of depth ``9n + 2`` (164 -> n = 18), widths 64/128/256."""

    def __init__(self, depth: int = 164, *, shared: bool = False, num_classes: int = 10, in_chans: int = 3,
                 **kwargs: Any) -> None:
        """``kwargs``: ``global_pool``, ``drop_rate``, ``drop_path_rate``."""
        if depth < 11 or (depth - 2) % 9:
            raise ConfigError(f"PreActResNet: depth must be 9n+2 (e.g. 164), got {depth}")
        widths = (64, 128, 256)
        super().__init__(
            PreActBottleneck, widths, (depth - 2) // 9, tuple(c // 4 for c in widths),  # type: ignore[arg-type]
            shared=shared, num_classes=num_classes, in_chans=in_chans, **kwargs,
        )


class WideResNet(_CifarPreActNet):
    """WRN-``depth``-``widen`` (depth ``6n + 4``), widths 16k/32k/64k."""

    def __init__(
        self, depth: int = 28, widen: int = 10, *, shared: bool = False, num_classes: int = 10,
        in_chans: int = 3, **kwargs: Any,
    ) -> None:
        """``kwargs``: ``global_pool``, ``drop_rate``, ``drop_path_rate``."""
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"WideResNet: depth must be 6n+4 (e.g. 28, 40), got {depth}")
        if widen < 1:
            raise ConfigError(f"WideResNet: widen factor must be >= 1, got {widen}")
        widths = (16 * widen, 32 * widen, 64 * widen)
        super().__init__(
            PreActBasic, widths, (depth - 4) // 6, widths,
            shared=shared, num_classes=num_classes, in_chans=in_chans, **kwargs,
        )


# name -> (class, its config, default num_classes, README row); each registered free and ``_shared``.
_CFGS: dict[str, tuple[Callable[..., nn.Module], dict[str, int], int, str]] = {
    "sharesnet164": (PreActResNet, {"depth": 164}, 10, "README: CIFAR-10 ResNet-164 (pre-act)"),
    "wrn40_4": (WideResNet, {"depth": 40, "widen": 4}, 10, "README: CIFAR-10 WRN-40-4"),
    "wrn28_10": (WideResNet, {"depth": 28, "widen": 10}, 100, "README: CIFAR-100 WRN-28-10"),
}


def _build(variant: str, /, **kwargs: Any) -> nn.Module:
    base = variant.removesuffix("_shared")
    cls, cfg, classes, _ = _CFGS[base]
    shared = variant.endswith("_shared")
    return cls(**variant_args(variant, {**cfg, "shared": shared}, {"num_classes": classes, **kwargs}))


def _create_sharesnet(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build ``variant`` (a :data:`_CFGS` name, ``_shared``: ShaResNet's sharing) with ``kwargs``."""
    return build_model_with_cfg(partial(_build, variant), variant, pretrained, **kwargs)


default_cfgs: dict[str, ModelInfo] = {
    name + suffix: ModelInfo(
        name + suffix, "sharesnet", num_classes=classes, paper=PAPER, table_row=row,
        shared_twin=name if suffix else None,
        notes=f"default num_classes={classes} as in the ShaResNet README row",
        first_conv="stem", classifier="fc",
    )
    for name, (_, _, classes, row) in _CFGS.items() for suffix in ("", "_shared")
}


@register_model
def sharesnet164(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-activation ResNet-164 (bottleneck), every conv free."""
    return _create_sharesnet("sharesnet164", pretrained, **kwargs)


@register_model
def sharesnet164_shared(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """ShaResNet-164: one 3x3 kernel per stage shared by units 2..n."""
    return _create_sharesnet("sharesnet164_shared", pretrained, **kwargs)


@register_model
def wrn40_4(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """Wide ResNet WRN-40-4, every conv free."""
    return _create_sharesnet("wrn40_4", pretrained, **kwargs)


@register_model
def wrn40_4_shared(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-40-4 with ShaResNet's sharing (each stage's second 3x3 convs of units 2..n)."""
    return _create_sharesnet("wrn40_4_shared", pretrained, **kwargs)


@register_model
def wrn28_10(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """Wide ResNet WRN-28-10 (CIFAR-100 by default), every conv free."""
    return _create_sharesnet("wrn28_10", pretrained, **kwargs)


@register_model
def wrn28_10_shared(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-28-10 with ShaResNet's sharing (CIFAR-100 by default)."""
    return _create_sharesnet("wrn28_10_shared", pretrained, **kwargs)
