"""VGG-16 with one fully connected layer for 32x32 input ("VGG (1-fc)", DACNN Tables 3 and 6).

Simonyan and Zisserman (arXiv 1409.1556) configuration D: 13 3x3 convolutions, each followed by
BatchNorm and ReLU, five 2x2 max-pools, then global pooling and a single linear classifier (the CIFAR
adaptation used as the DACNN baseline).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from dacnn.models.base import ClassifierMixin, Stage, check_drop_path
from dacnn.models.layers import conv3x3, init_weights
from dacnn.registry import ModelInfo, build_model_with_cfg, register_model

__all__ = ["VGG"]

CFG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(ClassifierMixin, nn.Module):
    """VGG from a layer list (ints are conv widths, ``"M"`` max-pools); ``width`` scales channels.

    The layers stay one flat ``features`` list (torchvision's and timm's names); its feature levels
    are the first conv-BN-ReLU (the stem) and each pooled group after it.
    """

    def __init__(
        self, cfg: tuple = CFG_D, *, width: int = 64, num_classes: int = 100, in_chans: int = 3,
        global_pool: str = "avg", drop_rate: float = 0.0, drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        check_drop_path("VGG", drop_path_rate, "no residual branch")
        layers: list[nn.Module] = []
        cin, reduction = in_chans, 1
        self.feature_info = []
        self._ends: list[int] = []  # features[: end] is the input of the next level
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                reduction *= 2
                self._level(len(layers), cin, reduction)
                continue
            c = v * width // 64
            layers += [conv3x3(cin, c), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            cin = c
            if len(layers) == 3:
                self._level(3, c, reduction)
        self.features = nn.Sequential(*layers)
        self._set_head(cin, num_classes, global_pool, drop_rate)
        init_weights(self)

    def _level(self, end: int, channels: int, reduction: int) -> None:
        self.feature_info.append(dict(num_chs=channels, reduction=reduction, module=f"features.{end - 1}"))
        self._ends.append(end)

    def _run(self, start: int, end: int, x: torch.Tensor) -> torch.Tensor:
        for i in range(start, end):
            x = self.features[i](x)
        return x

    def _stages(self) -> list[Stage]:
        starts = [0, *self._ends[:-1]]
        return [partial(self._run, a, b) for a, b in zip(starts, self._ends)]

    def _prune_level(self, name: str) -> None:
        level = [f["module"] for f in self.feature_info].index(name)
        start = ([0, *self._ends])[level]
        for i in range(start, self._ends[level]):
            self.features[i] = nn.Identity()

    def _group_patterns(self, coarse: bool) -> tuple[str, str]:
        # timm's VGG groups its flat features by index; the stem is the first conv-BN
        return r"^features\.[01]\.", r"^features\.(?![01]\.)(\d+)\."


# name -> (layer list, ModelInfo fields): the family's configs, built by :func:`_create_vgg`.
_CFGS: dict[str, tuple[tuple, dict[str, Any]]] = {
    "vgg16_1fc": (CFG_D, {"paper": "arXiv 1409.1556 (baseline of arXiv 1904.09764)",
                          "table_row": "Table 6: VGG (1-fc)"}),
}


def _build(variant: str, /, **kwargs: Any) -> VGG:
    return VGG(_CFGS[variant][0], **kwargs)


def _create_vgg(variant: str, pretrained: bool = False, **kwargs: Any) -> VGG:
    """Build ``variant`` of :data:`_CFGS` with ``kwargs`` (width, classes, input channels...)."""
    return build_model_with_cfg(partial(_build, variant), variant, pretrained, **kwargs)


default_cfgs: dict[str, ModelInfo] = {
    name: ModelInfo(name, "vgg", first_conv="features.0", classifier="fc", **fields)
    for name, (_, fields) in _CFGS.items()
}


@register_model
def vgg16_1fc(pretrained: bool = False, **kwargs: Any) -> VGG:
    """VGG-16 (configuration D) with one linear classifier, the free twin of DACNN-14 (MIX)."""
    return _create_vgg("vgg16_1fc", pretrained, **kwargs)
