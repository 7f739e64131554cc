"""Deep Anchored CNNs (Huang, Dwivedi, Roig; arXiv 1904.09764).

* :class:`PlainDACNN` (section 3, eq. 2-3): a stem conv 3->C, then one C x C 3x3 kernel applied at
  every layer, each use followed by its own BatchNorm and ReLU; max-pooling between groups of
  convolutions (VGG-16's grouping for 14 layers); a linear classifier.
* :class:`ResidualDACNN` (eq. 6, used for depth > 17): residual blocks of two uses of the anchor,
  four sections of equal width cut by three pooling layers (Table 4), optional *regulators*.
* :class:`MixedDACNN` (section 3 "Mixed Architecture", Table 3): one shared kernel per resolution
  section with widths 64->128->256->512, a free transition conv per channel expansion and, with
  residual learning, a free 1x1 projection on the expanding shortcut.
* :class:`Regulator` (Figure 3 right, Tables 4-5): free 1x1 conv + BN + ReLU appended to a block.

``depth`` counts weight layers as the paper does: convolutions plus the one linear classifier
(DACNN-14 = 13 convolutions + FC). Where the official release code differs (conv->ReLU->BN order,
conv biases, unused regulators, channel rotation, the release ResNets' fourth max-pool after the
last group, ``Mix_Net``'s bare first conv of ``block_512_2``; see ``docs/reference/SPEC.md``
section 3) this file follows the paper; ``docs/parameters.md`` says how that compares with the paper's counts.

Parameter accounting (:mod:`dacnn.analysis.paper_figures`): of the 44 parameter figures printed in
Tables 2-6 this reading matches 6 to the printed precision (Table 2 at 3 layers, Table 4's four single
sections, Table 6's DACNN-34). The tables disagree with each other (Table 2 vs 6 on DACNN-18, Tables 4/5/6 on
the regulators' size), and the other readings tried (depth = kernel uses, conv biases, 10 classes,
the release code's 3,4,6,3 layout, regulators without BN) match at most 7; only counting
conventions that drop BatchNorm's shift (11) or all of BatchNorm (16) match more, and they are not
the network the paper trains. See :data:`dacnn.analysis.paper_figures.READING_NOTES`.

Every class has one layout (timm's): ``stem`` (the first conv, BN, ReLU), ``kernels`` (the shared
kernels), ``stages`` (one ``nn.Sequential`` per resolution section: a plain net's pooling groups, a
residual net's sections), ``pool`` and ``fc``. Weight files saved under the earlier names (``anchor.``,
``head.fc.``; the flat ``features.<i>`` of the plain and VGG-template nets, ``sections.<s>`` of the
residual one) load through each instance's ``legacy_keys``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from torch import nn

from dacnn.models.base import ClassifierMixin, Stage, check_drop_path
from dacnn.models.layers import (
    BasicBlock,
    Regulator,
    conv1x1,
    conv3x3,
    conv_use,
    drop_path_rates,
    init_weights,
    split_evenly,
)
from dacnn.registry import ModelInfo, build_model_with_cfg, register_model, variant_args
from dacnn.shared_kernel import SharedKernel

__all__ = ["PlainDACNN", "ResidualDACNN", "MixedDACNN", "Regulator"]

PAPER = "arXiv 1904.09764"
RESNET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}  # He et al.'s layouts for the two templates
_OLD_NAMES = ((r"^anchor\.", "kernels.anchor."), (r"^head\.fc\.", "fc."))  # before 2026-12


def _norm(channels: int, batchnorm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()


def parse_sections(regulators: Sequence[int] | str | None, num_sections: int = 4) -> tuple[int, ...]:
    """``"all"``, ``"none"``, ``"1,3"`` or a sequence of 1-based section indices -> sorted tuple."""
    if regulators is None or regulators == "none" or regulators == "":
        return ()
    if regulators == "all":
        return tuple(range(1, num_sections + 1))
    if isinstance(regulators, str):
        regulators = [int(s) for s in regulators.split(",")]
    sections = tuple(sorted(set(int(s) for s in regulators)))
    bad = [s for s in sections if not 1 <= s <= num_sections]
    if bad:
        raise ValueError(f"regulator sections must be in 1..{num_sections}, got {bad}")
    return sections


class ConvBNReLU(nn.Sequential):
    """One layer ``F_l`` of eq. 1: convolution (shared or free), BatchNorm (eq. 4), ReLU."""

    def __init__(self, conv: nn.Module, channels: int, batchnorm: bool = True) -> None:
        super().__init__(conv, _norm(channels, batchnorm), nn.ReLU(inplace=True))


def _flat_names(groups: Sequence[int]) -> tuple[tuple[str, str], ...]:
    """``legacy_keys`` of a net that kept its convs in one flat ``features`` list (a conv-BN-ReLU per
    layer, a max-pool after each group): ``features.<i>.`` -> ``stem.`` or ``stages.<g>.<j>.``."""
    pairs, flat = [], 0
    for g, size in enumerate(groups):
        for i in range(size):
            new = "stem." if (g, i) == (0, 0) else f"stages.{g}.{i - 1 if g == 0 else i}."
            pairs.append((rf"^features\.{flat}\.", new))
            flat += 1
        flat += 1  # the group's max-pool
    return tuple(pairs)


class _DACNNBase(ClassifierMixin, nn.Module):
    """timm's interface over ``stem``, ``stages``, global pooling (``pool``) and ``fc``; shared
    kernels in ``self.kernels`` (empty for the free twins)."""

    legacy_keys: tuple[tuple[str, str], ...] = _OLD_NAMES

    def _stages(self) -> list[Stage]:
        return [self.stem, *self.stages]

    def _group_patterns(self, coarse: bool) -> tuple[str, str]:
        return r"^stem\.", (r"^stages\.(\d+)\." if coarse else r"^stages\.(\d+)\.(\d+)\.")

    def _levels(self, channels: Sequence[int], reductions: Sequence[int]) -> None:
        """``feature_info``: the stem, then one level per stage."""
        self.feature_info = [dict(num_chs=c, reduction=r, module="stem" if i == 0 else f"stages.{i - 1}")
                             for i, (c, r) in enumerate(zip(channels, reductions))]


class PlainDACNN(_DACNNBase):
    """VGG-style DACNN of ``depth`` weight layers (``depth - 1`` convs + FC), paper eq. 2-3.

    The ``depth - 1`` convolutions fall into ``min(5, depth - 1)`` groups (VGG-16's 2,2,3,3,3 for
    depth 14), each followed by 2x2 max-pooling; the stem is the first group's first conv. ``shared=False``
    gives the free-weight twin.
    """

    def __init__(
        self,
        depth: int = 14,
        width: int = 128,
        *,
        shared: bool = True,
        batchnorm: bool = True,
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 3:
            raise ValueError(f"PlainDACNN depth must be >= 3 (stem, one anchored conv, FC), got {depth}")
        check_drop_path("a plain DACNN", drop_path_rate, "no residual branch")
        bias = not batchnorm  # without BN a conv keeps its bias (Table 1 ablation)
        self.kernels = nn.ModuleDict({"anchor": SharedKernel(width, width, 3, bias=bias)} if shared else {})
        anchor = self.kernels["anchor"] if shared else None
        groups = split_evenly(depth - 1, min(5, depth - 1))
        self.legacy_keys = _OLD_NAMES + _flat_names(groups)
        self.stem = ConvBNReLU(conv3x3(in_chans, width, bias=bias), width, batchnorm)  # eq. 2, W_1
        stages = []
        for g, size in enumerate(groups):
            layers = [ConvBNReLU(conv_use(anchor, width, width, bias=bias), width, batchnorm)  # eq. 3, W_G
                      for _ in range(size - (g == 0))]
            stages.append(nn.Sequential(*layers, nn.MaxPool2d(2)))
        self.stages = nn.Sequential(*stages)
        self._levels([width] * (len(groups) + 1), [2**g for g in range(len(groups) + 1)])
        self._set_head(width, num_classes, global_pool, drop_rate)
        init_weights(self)


class ResidualDACNN(_DACNNBase):
    """DACNN with residual learning (eq. 6): stem, four equal-width sections of anchored blocks.

    ``depth - 2`` must be even (two convs per block); 18 and 34 use ResNet-18/34's block layouts,
    other depths split the blocks evenly (24 -> 2,3,3,3). Three 2x2 max-pools end the first three
    sections (Table 4). ``regulators`` lists the sections whose blocks get a :class:`Regulator`.
    """

    def __init__(
        self,
        depth: int = 18,
        width: int = 128,
        *,
        shared: bool = True,
        batchnorm: bool = True,
        regulators: Sequence[int] | str | None = None,
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 4 or (depth - 2) % 2:
            raise ValueError(f"ResidualDACNN depth must be even and >= 4, got {depth}")
        self.legacy_keys = (*_OLD_NAMES, (r"^sections\.", "stages."))
        blocks = RESNET_BLOCKS.get(depth) or split_evenly((depth - 2) // 2, 4)
        rates = iter(drop_path_rates(drop_path_rate, sum(blocks)))
        self.regulator_sections = parse_sections(regulators)
        self.stem = ConvBNReLU(conv3x3(in_chans, width, bias=not batchnorm), width, batchnorm)
        self.kernels = nn.ModuleDict(
            {"anchor": SharedKernel(width, width, 3, bias=not batchnorm)} if shared else {})
        anchor = self.kernels["anchor"] if shared else None
        stages: list[nn.Module] = []
        for s, n in enumerate(blocks, start=1):
            stage = [
                BasicBlock(
                    width,
                    width,
                    conv1=conv_use(anchor, width, width, bias=not batchnorm),
                    conv2=conv_use(anchor, width, width, bias=not batchnorm),
                    norm_layer=nn.BatchNorm2d if batchnorm else nn.Identity,
                    regulator=s in self.regulator_sections,
                    drop_path_rate=next(rates),
                )
                for _ in range(n)
            ]
            if s < len(blocks):
                stage.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self._levels([width] * 5, [1, 2, 4, 8, 8])
        self._set_head(width, num_classes, global_pool, drop_rate)
        init_weights(self)


class MixedDACNN(_DACNNBase):
    """Mixed DACNN: one shared kernel per section width, 3 -> w -> 2w -> 4w -> 8w (w = 64).

    ``template="vgg"`` (DACNN-14 MIX): VGG-16's 13 convs in five pooled sections; sections 4 and 5
    (both 8w wide) share one kernel, so 8 kernels in all as the paper counts (4 for expansion,
    4 shared). ``template="resnet"`` (DACNN-18/34 MIX): ResNet-18/34 block layouts; the first block
    of sections 2-4 replaces its first conv by the free transition conv and projects the shortcut
    with a free 1x1 conv + BN; three max-pools, each at the start of sections 2-4, cut the sections.
    """

    def __init__(
        self,
        depth: int = 18,
        width: int = 64,
        *,
        template: str = "resnet",
        shared: bool = True,
        regulators: Sequence[int] | str | None = None,
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.kernels = nn.ModuleDict(
            {str(c): SharedKernel(c, c, 3) for c in widths} if shared else {}
        )
        kernel = (lambda c: self.kernels[str(c)]) if shared else (lambda c: None)
        self.regulator_sections = parse_sections(regulators)
        stages: list[nn.Module] = []
        if template == "vgg":
            if self.regulator_sections:
                raise ValueError("regulators need residual blocks: use template='resnet'")
            if depth != 14:
                raise ValueError(f"the VGG template of MixedDACNN has depth 14, got {depth}")
            check_drop_path("the VGG template of MixedDACNN", drop_path_rate, "no residual branch")
            groups = (2, 2, 3, 3, 3)
            self.legacy_keys = _OLD_NAMES + _flat_names(groups)
            self.stem = ConvBNReLU(conv3x3(in_chans, widths[0]), widths[0])
            cin = widths[0]
            for g, (c, n) in enumerate(zip(widths + [widths[-1]], groups)):
                layers = []
                for _ in range(n - (g == 0)):
                    layers.append(ConvBNReLU(conv_use(kernel(c), c, c) if cin == c else conv3x3(cin, c), c))
                    cin = c
                stages.append(nn.Sequential(*layers, nn.MaxPool2d(2)))
            self._levels([widths[0], *widths, widths[-1]], [1, 2, 4, 8, 16, 32])
        elif template == "resnet":
            if depth not in RESNET_BLOCKS:
                raise ValueError(f"the ResNet template of MixedDACNN has depth 18 or 34, got {depth}")
            self.legacy_keys = (*_OLD_NAMES, (r"^features\.0\.", "stem."),
                                *((rf"^features\.{k}\.", f"stages.{k - 1}.") for k in range(1, 5)))
            rates = iter(drop_path_rates(drop_path_rate, sum(RESNET_BLOCKS[depth])))
            self.stem = ConvBNReLU(conv3x3(in_chans, widths[0]), widths[0])
            cin = widths[0]
            for s, (c, n) in enumerate(zip(widths, RESNET_BLOCKS[depth]), start=1):
                stage: list[nn.Module] = [] if s == 1 else [nn.MaxPool2d(2)]
                for b in range(n):
                    expand = b == 0 and cin != c
                    stage.append(
                        BasicBlock(
                            cin,
                            c,
                            conv1=conv3x3(cin, c) if expand else conv_use(kernel(c), c, c),
                            conv2=conv_use(kernel(c), c, c),
                            shortcut=nn.Sequential(conv1x1(cin, c), nn.BatchNorm2d(c)) if expand else None,
                            regulator=s in self.regulator_sections,
                            drop_path_rate=next(rates),
                        )
                    )
                    cin = c
                stages.append(nn.Sequential(*stage))
            self._levels([widths[0], *widths], [1, 1, 2, 4, 8])
        else:
            raise ValueError(f"MixedDACNN template must be 'vgg' or 'resnet', got {template!r}")
        self.stages = nn.Sequential(*stages)
        self._set_head(widths[-1], num_classes, global_pool, drop_rate)
        init_weights(self)


def _dacnn(
    depth: int = 14,
    width: int = 128,
    *,
    shared: bool = True,
    batchnorm: bool = True,
    residual: bool | None = None,
    regulators: Sequence[int] | str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Plain DACNN of any depth and width; residual learning for depth > 17 unless told otherwise."""
    if residual is None:
        residual = depth > 17
    if residual:
        return ResidualDACNN(depth, width, shared=shared, batchnorm=batchnorm, regulators=regulators,
                             **kwargs)
    if regulators not in (None, "none", "", ()):
        raise ValueError("regulators are appended to residual blocks: use a residual DACNN")
    return PlainDACNN(depth, width, shared=shared, batchnorm=batchnorm, **kwargs)


# name -> (paper row, builder kwargs, free-weight twin): one per row of the paper's Table 6.
_CFGS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "dacnn": ("Table 2 (any depth/width)", {}, None),
    "dacnn14": ("Table 6: DACNN-14 (plain)", {"depth": 14}, None),
    "dacnn18": ("Table 6: DACNN-18 (plain)", {"depth": 18}, None),
    "dacnn34": ("Table 6: DACNN-34 (plain)", {"depth": 34}, None),
    "dacnn18_reg": ("Table 6: DACNN-18 (REG)", {"depth": 18, "regulators": "all"}, None),
    "dacnn24_reg": ("Table 6: DACNN-24 (REG)", {"depth": 24, "regulators": "all"}, None),
    "dacnn34_reg": ("Table 6: DACNN-34 (REG)", {"depth": 34, "regulators": "all"}, None),
    "dacnn14_mix": ("Table 6: DACNN-14 (MIX)", {"mixed": True, "depth": 14, "template": "vgg"}, "vgg16_1fc"),
    "dacnn18_mix": ("Table 6: DACNN-18 (MIX)", {"mixed": True, "depth": 18}, "resnet18"),
    "dacnn34_mix": ("Table 6: DACNN-34 (MIX)", {"mixed": True, "depth": 34}, "resnet34"),
    "dacnn18_mix_reg": ("Table 6: DACNN-18 (MIX, REG)", {"mixed": True, "depth": 18, "regulators": "all"},
                        None),
    "dacnn34_mix_reg": ("Table 6: DACNN-34 (MIX, REG)", {"mixed": True, "depth": 34, "regulators": "all"},
                        None),
}


def _build(variant: str, /, **kwargs: Any) -> nn.Module:
    """``variant`` of :data:`_CFGS` with ``kwargs`` (width, classes, regulators...; not the depth or
    template the row fixes)."""
    fixed = dict(_CFGS[variant][1])
    defaults = {k: fixed.pop(k) for k in ("regulators",) if k in fixed}  # REG rows: "all" unless told
    cfg = variant_args(variant, fixed, kwargs, defaults)
    return MixedDACNN(**cfg) if cfg.pop("mixed", False) else _dacnn(**cfg)


def _create_dacnn(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return build_model_with_cfg(partial(_build, variant), variant, pretrained, **kwargs)


default_cfgs: dict[str, ModelInfo] = {
    name: ModelInfo(name, "dacnn", paper=PAPER, table_row=row, shared_twin=twin, first_conv="stem.0",
                    classifier="fc")
    for name, (row, _, twin) in _CFGS.items()
}


@register_model
def dacnn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """DACNN of any ``depth`` and ``width`` (Table 2): plain up to 17 layers, residual beyond
    (``residual=``), ``shared=False`` for the free twin, ``regulators=`` for a residual one."""
    return _create_dacnn("dacnn", pretrained, **kwargs)


@register_model
def dacnn14(pretrained: bool = False, **kwargs: Any) -> PlainDACNN:
    """DACNN-14, plain: a stem and 12 uses of one shared kernel in VGG-16's five groups (Table 6)."""
    return _create_dacnn("dacnn14", pretrained, **kwargs)


@register_model
def dacnn18(pretrained: bool = False, **kwargs: Any) -> ResidualDACNN:
    """DACNN-18: residual, ResNet-18's 2,2,2,2 blocks, one shared kernel (Table 6)."""
    return _create_dacnn("dacnn18", pretrained, **kwargs)


@register_model
def dacnn34(pretrained: bool = False, **kwargs: Any) -> ResidualDACNN:
    """DACNN-34: residual, ResNet-34's 3,4,6,3 blocks, one shared kernel (Table 6)."""
    return _create_dacnn("dacnn34", pretrained, **kwargs)


@register_model
def dacnn18_reg(pretrained: bool = False, **kwargs: Any) -> ResidualDACNN:
    """DACNN-18 with a regulator after every block (Table 6, REG)."""
    return _create_dacnn("dacnn18_reg", pretrained, **kwargs)


@register_model
def dacnn24_reg(pretrained: bool = False, **kwargs: Any) -> ResidualDACNN:
    """DACNN-24 (blocks 2,3,3,3) with regulators (Table 6, REG)."""
    return _create_dacnn("dacnn24_reg", pretrained, **kwargs)


@register_model
def dacnn34_reg(pretrained: bool = False, **kwargs: Any) -> ResidualDACNN:
    """DACNN-34 with regulators (Table 6, REG)."""
    return _create_dacnn("dacnn34_reg", pretrained, **kwargs)


@register_model
def dacnn14_mix(pretrained: bool = False, **kwargs: Any) -> MixedDACNN:
    """DACNN-14 (MIX): VGG-16's layout, one shared kernel per width (Table 6)."""
    return _create_dacnn("dacnn14_mix", pretrained, **kwargs)


@register_model
def dacnn18_mix(pretrained: bool = False, **kwargs: Any) -> MixedDACNN:
    """DACNN-18 (MIX): ResNet-18's layout, one shared kernel per section width (Table 6)."""
    return _create_dacnn("dacnn18_mix", pretrained, **kwargs)


@register_model
def dacnn34_mix(pretrained: bool = False, **kwargs: Any) -> MixedDACNN:
    """DACNN-34 (MIX): ResNet-34's layout, one shared kernel per section width (Table 6)."""
    return _create_dacnn("dacnn34_mix", pretrained, **kwargs)


@register_model
def dacnn18_mix_reg(pretrained: bool = False, **kwargs: Any) -> MixedDACNN:
    """DACNN-18 (MIX, REG): the mixed ResNet-18 layout with regulators (Table 6)."""
    return _create_dacnn("dacnn18_mix_reg", pretrained, **kwargs)


@register_model
def dacnn34_mix_reg(pretrained: bool = False, **kwargs: Any) -> MixedDACNN:
    """DACNN-34 (MIX, REG): the mixed ResNet-34 layout with regulators (Table 6)."""
    return _create_dacnn("dacnn34_mix_reg", pretrained, **kwargs)
