"""ResNet-18 and ResNet-34 for 32x32 input (He et al., arXiv 1512.03385; DACNN Tables 3, 6, 7).

The usual CIFAR adaptation: a 3x3 stride-1 stem without max-pool, four stages of basic blocks at
64/128/256/512 channels (strides 1, 2, 2, 2), 1x1 projection + BN on expanding shortcuts (option B),
global average pooling and one linear layer.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from dacnn.models.base import ClassifierMixin, Stage
from dacnn.models.layers import BasicBlock, conv3x3, drop_path_rates, init_weights
from dacnn.registry import ModelInfo, build_model_with_cfg, register_model, variant_args

__all__ = ["ResNet"]


class ResNet(ClassifierMixin, nn.Module):
    """CIFAR ResNet with basic blocks; ``layers`` blocks per stage, ``width`` channels in stage 1."""

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        *,
        width: int = 64,
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv3x3(in_chans, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        rates = iter(drop_path_rates(drop_path_rate, sum(layers)))
        stages, cin = [], width
        self.feature_info = [dict(num_chs=width, reduction=1, module="stem")]
        for i, n in enumerate(layers):
            cout = width * 2**i
            blocks = [BasicBlock(cin, cout, 1 if i == 0 else 2, drop_path_rate=next(rates))]
            blocks += [BasicBlock(cout, cout, drop_path_rate=next(rates)) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=cout, reduction=2**i, module=f"stages.{i}"))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self._set_head(cin, num_classes, global_pool, drop_rate)
        init_weights(self)

    def _stages(self) -> list[Stage]:
        return [self.stem, *self.stages]

    def _group_patterns(self, coarse: bool) -> tuple[str, str]:
        return r"^stem\.", (r"^stages\.(\d+)\." if coarse else r"^stages\.(\d+)\.(\d+)\.")


# name -> (blocks per stage, paper row)
_CFGS = {"resnet18": ((2, 2, 2, 2), "Table 6: ResNet18"), "resnet34": ((3, 4, 6, 3), "Table 6: ResNet34")}


def _build(variant: str, /, **kwargs: Any) -> ResNet:
    return ResNet(**variant_args(variant, {"layers": _CFGS[variant][0]}, kwargs))


def _create_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNet:
    """Build ``variant`` of :data:`_CFGS` with ``kwargs`` (width, classes, input channels...)."""
    return build_model_with_cfg(partial(_build, variant), variant, pretrained, **kwargs)


default_cfgs: dict[str, ModelInfo] = {
    name: ModelInfo(name, "resnet", paper="arXiv 1512.03385 (baseline of arXiv 1904.09764)", table_row=row,
                    first_conv="stem.0", classifier="fc")
    for name, (_, row) in _CFGS.items()
}


@register_model
def resnet18(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """CIFAR ResNet-18 (blocks 2,2,2,2), the free twin of DACNN-18 (MIX)."""
    return _create_resnet("resnet18", pretrained, **kwargs)


@register_model
def resnet34(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """CIFAR ResNet-34 (blocks 3,4,6,3), the free twin of DACNN-34 (MIX)."""
    return _create_resnet("resnet34", pretrained, **kwargs)
