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

from dacnn.models.base import ClassifierMixin
from dacnn.models.layers import conv3x3, init_weights
from dacnn.registry import ModelInfo, register_model

__all__ = ["VGG", "vgg16_1fc"]

CFG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(ClassifierMixin, nn.Module):
    """VGG from a layer list (ints are conv widths, ``"M"`` max-pools); ``width`` scales channels."""

    def __init__(
        self, cfg: tuple = CFG_D, *, width: int = 64, num_classes: int = 100, in_chans: int = 3
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            c = v * width // 64
            layers += [conv3x3(cin, c), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            cin = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.num_classes, self.num_features = num_classes, cin
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# name -> (layer list, ModelInfo fields): the family's configs, built by :func:`_create_vgg`.
_CFGS: dict[str, tuple[tuple, dict[str, Any]]] = {
    "vgg16_1fc": (CFG_D, {"paper": "arXiv 1409.1556 (baseline of arXiv 1904.09764)",
                          "table_row": "Table 6: VGG (1-fc)"}),
}


def _create_vgg(variant: str, /, **kwargs: Any) -> nn.Module:
    """Build ``variant`` of :data:`_CFGS` with ``kwargs`` (width, classes, input channels)."""
    return VGG(_CFGS[variant][0], **kwargs)


def vgg16_1fc(**kwargs: Any) -> nn.Module:
    """VGG-16 (configuration D) with one linear classifier."""
    return _create_vgg("vgg16_1fc", **kwargs)


for _name, (_layers, _fields) in _CFGS.items():
    register_model(ModelInfo(_name, "vgg", first_conv="features.0", classifier="fc", **_fields))(
        partial(_create_vgg, _name))
