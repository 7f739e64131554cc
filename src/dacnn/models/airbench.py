"""airbench94 (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", arXiv 2404.00498;
code: github.com/KellerJordan/cifar10-airbench, ``airbench/lib_airbench94.py``, MIT licence).

The net: a frozen 2x2 *patch-whitening* conv (3 -> 24 channels, initialised from the training data's
patch covariance, :meth:`Airbench.init_whitening`) and GELU, three conv groups ``conv -> 2x2 max-pool ->
BN -> GELU -> conv -> BN -> GELU`` at widths ``w, 4w, 4w`` (``w = 64``), a 3x3 max-pool, a bias-free
linear layer and a fixed logit scale of 1/9. Convolutions have no bias and start as the identity on
their first ``in_channels`` outputs (``dirac_``); BatchNorm has eps 1e-12, momentum 0.4 (airbench's
0.6) and a frozen scale of 1 (its weight is a parameter that is never trained), so only its shift
learns. 1,972,792 parameters, the frozen whitening conv and BN scales included.

``airbench94_shared`` is its DACNN twin (arXiv 1904.09764, eq. 3 applied to airbench): the three
isomorphic 256x256 3x3 convs (block 2's second, block 3's first and second) are three uses of one
:class:`~dacnn.shared_kernel.SharedKernel`, each keeping its own BatchNorm; 793,144 parameters. At
initialisation the two nets compute the same function (each of those convs starts as the identity).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from dacnn.errors import ConfigError
from dacnn.models.base import ClassifierMixin, Stage, check_drop_path
from dacnn.registry import ModelInfo, build_model_with_cfg, register_model, variant_args
from dacnn.shared_kernel import AnchoredConv2d, SharedKernel

__all__ = ["Airbench", "ConvGroup", "patch_whitening_weights"]

PAPER = "arXiv 2404.00498 (airbench94)"
WHITEN_KERNEL = 2


def BatchNorm(channels: int, momentum: float = 0.4, eps: float = 1e-12) -> nn.BatchNorm2d:  # noqa: N802
    """airbench's BatchNorm: eps 1e-12, running-average momentum 0.4, scale frozen at 1 (no affine
    weight is learned), shift learned. A plain ``nn.BatchNorm2d`` (not a subclass), so ``torch.fx``
    keeps it a leaf."""
    bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
    bn.weight.requires_grad_(False)
    return bn


def dirac_init_(weight: torch.Tensor) -> None:
    """airbench's conv init: PyTorch's default, then the identity on the first ``in`` outputs."""
    with torch.no_grad():
        nn.init.dirac_(weight[: weight.shape[1]])


class ConvGroup(nn.Module):
    """``GELU(BN(conv2(GELU(BN(pool(conv1(x)))))))`` (airbench's ``ConvGroup``)."""

    def __init__(self, cin: int, cout: int, conv1: nn.Module | None = None,
                 conv2: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1 if conv1 is not None else nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(cout)
        self.conv2 = conv2 if conv2 is not None else nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = BatchNorm(cout)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


def patch_whitening_weights(images: torch.Tensor, kernel_size: int | tuple[int, int],
                            eps: float = 5e-4) -> torch.Tensor:
    """ZCA-style patch whitening filters (airbench ``init_whitening_conv``): the eigenvectors of the
    ``k x k`` patch covariance of ``images`` (N, C, H, W; already normalised), each scaled by
    ``1 / sqrt(eigenvalue + eps)``, largest eigenvalue first, then the same filters negated:
    ``(2 C k k, C, k, k)``."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    c = images.shape[1]
    patches = images.float().unfold(2, kh, 1).unfold(3, kw, 1).transpose(1, 3).reshape(-1, c * kh * kw)
    cov = patches.double().T @ patches.double() / patches.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
    filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).reshape(-1, c, kh, kw)
    return torch.cat((filters, -filters)).float()


class Airbench(ClassifierMixin, nn.Module):
    """airbench94's net at base width ``width`` (blocks ``w, 4w, 4w``); ``shared=True`` ties the three
    ``4w x 4w`` convs to one kernel (``kernels["conv"]``).

    Its head is airbench's: a 3x3 max-pool, which is a global max-pool of the 3x3 map a 32x32 image
    gives (``global_pool="max"``; ``""``: none), a bias-free linear layer and the logit scale;
    ``drop_rate`` adds dropout before the linear layer (airbench has none)."""

    global_pool = "max"
    pool_types = ("max", "")

    def __init__(self, width: int = 64, *, shared: bool = False, num_classes: int = 10, in_chans: int = 3,
                 logit_scale: float = 1 / 9, global_pool: str = "max", drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"Airbench: width must be >= 1, got {width}")
        check_drop_path("airbench", drop_path_rate, "no residual branch")
        widths = (width, 4 * width, 4 * width)
        whiten_width = 2 * in_chans * WHITEN_KERNEL**2
        self.whiten = nn.Conv2d(in_chans, whiten_width, WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.act = nn.GELU()
        big = widths[2]
        self.kernels = nn.ModuleDict({"conv": SharedKernel(big, big, 3)} if shared else {})

        def use() -> nn.Module | None:
            return AnchoredConv2d(self.kernels["conv"], padding=1) if shared else None

        self.block1 = ConvGroup(whiten_width, widths[0])
        self.block2 = ConvGroup(widths[0], widths[1], conv2=use())
        self.block3 = ConvGroup(widths[1], widths[2], conv1=use(), conv2=use())
        self.feature_info = [dict(num_chs=whiten_width, reduction=1, module="whiten"),
                             *(dict(num_chs=c, reduction=2 ** (i + 1), module=f"block{i + 1}")
                               for i, c in enumerate(widths))]
        self._set_head(widths[2], num_classes, global_pool, drop_rate)
        self.logit_scale = logit_scale
        self.reset_parameters()

    def _pool(self, global_pool: str) -> nn.Module:
        if global_pool not in self.pool_types:
            raise ConfigError(f"Airbench: global_pool must be 'max' (airbench's 3x3 max-pool) or '', "
                              f"got {global_pool!r}")
        return nn.MaxPool2d(3) if global_pool else nn.Identity()

    def _classifier(self, num_classes: int) -> nn.Module:
        if num_classes and not self.global_pool:
            raise ConfigError("Airbench: global_pool='' (no pooling) needs num_classes=0")
        return nn.Linear(self.head_hidden_size, num_classes, bias=False) if num_classes else nn.Identity()

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.whiten(x))

    def _stages(self) -> list[Stage]:
        return [self._stem, self.block1, self.block2, self.block3]

    def _prune_level(self, name: str) -> None:
        if name == "whiten":
            raise ValueError("Airbench: the whitening conv is the first level and cannot be pruned")
        super()._prune_level(name)

    def _group_patterns(self, coarse: bool) -> tuple[str, str]:
        return r"^whiten\.", r"^block(\d+)\."

    def feature_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The 2x2 whitening conv has no padding (32 -> 31), then three 2x2 max-pools (31 -> 3)."""
        return ((hw[0] - 1) // 8, (hw[1] - 1) // 8)

    def reset_parameters(self) -> None:
        """PyTorch's default init, identity (dirac) on the convs' first outputs, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
                dirac_init_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, SharedKernel):
                nn.init.kaiming_uniform_(m.weight, a=5**0.5)
                dirac_init_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening conv from normalised training images (airbench uses the first 5,000)."""
        weight = patch_whitening_weights(images.to(self.whiten.weight.device), WHITEN_KERNEL, eps)
        self.whiten.weight.copy_(weight.to(self.whiten.weight.dtype))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = super().forward_head(x, pre_logits=True)
        return x if pre_logits else self.fc(x) * self.logit_scale


# name -> (builder kwargs, free-weight twin)
_CFGS: dict[str, tuple[dict[str, Any], str | None]] = {
    "airbench94": ({}, None),
    "airbench94_shared": ({"shared": True}, "airbench94"),
}


def _build(variant: str, /, **kwargs: Any) -> Airbench:
    return Airbench(**variant_args(variant, _CFGS[variant][0], kwargs))


def _create_airbench(variant: str, pretrained: bool = False, **kwargs: Any) -> Airbench:
    """Build ``variant`` of :data:`_CFGS` (``width``, ``num_classes``, ``in_chans``... may be given)."""
    return build_model_with_cfg(partial(_build, variant), variant, pretrained, **kwargs)


def _info(name: str) -> ModelInfo:
    cfg, twin = _CFGS[name]
    row = "airbench94 net" + (": the three 4w x 4w convs share one kernel" if cfg.get("shared") else "")
    return ModelInfo(name, "airbench", num_classes=10, paper=PAPER, table_row=row, shared_twin=twin,
                     first_conv="whiten", classifier="fc",
                     notes="CIFAR-10 by default; the whitening conv is set from data by the fast recipe")


default_cfgs: dict[str, ModelInfo] = {name: _info(name) for name in _CFGS}


@register_model
def airbench94(pretrained: bool = False, **kwargs: Any) -> Airbench:
    """airbench94's net: 1,972,792 parameters at width 64."""
    return _create_airbench("airbench94", pretrained, **kwargs)


@register_model
def airbench94_shared(pretrained: bool = False, **kwargs: Any) -> Airbench:
    """airbench94 with its three 256x256 convs sharing one kernel: 793,144 parameters at width 64."""
    return _create_airbench("airbench94_shared", pretrained, **kwargs)
