"""timm's RandAugment, RandomErasing and Mixup/CutMix on whole batches, seeded per batch.

The kernel-sharing ConvMixer recipe (SPEC.md 1.2) trains with timm 0.5.4's ``rand-m9-mstd0.5-inc1``,
RandomErasing (p 0.25, mode pixel, one box) and Mixup/CutMix (alpha 0.5 each, mode batch, switch
probability 0.5, label smoothing folded into the soft targets). These follow timm's sampling
(``timm/data/auto_augment.py``, ``random_erasing.py``, ``mixup.py``) with the pixel operations of
RandAugment taken from kornia (``kornia.enhance``, ``kornia.geometry``; the ``aug`` extra).

kornia's own classes were measured (``benchmarks/batch_augment.py``) but draw differently from the
reference: its ``RandAugment`` picks one pair of operations per batch at a fixed magnitude, where
timm picks two per image, each applied with probability 0.5 at a magnitude drawn around ``m``; its
``RandomMixUpV2`` draws lambda uniformly (no Beta(alpha, alpha)) per image; its ``RandomErasing``
fills with a constant, timm's pixel mode with normal noise. So the draws are timm's, made here
from a generator seeded by (seed, epoch, batch), and kornia only computes pixels.

Every draw is made for the global batch and can be sliced per DDP rank (``select``); mixing pairs
each image with its mirror in the batch (``x.flip(0)``, as timm) within the rank's part.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dacnn.errors import ConfigError

__all__ = ["OPERATIONS", "RandAugmentSpec", "RandAugment", "RandAugmentDraws", "ErasingDraws",
           "sample_erasing", "random_erasing", "MixSpec", "mix_batch", "soft_targets", "require_kornia"]

_LEVEL_DENOM = 10.0  # timm's magnitude scale: m10 is the full range of every operation
#: timm's ``_RAND_TRANSFORMS`` in its order (``inc1``: the Increasing variants of posterize, solarize and
#: the four enhancements); Cutout is left out there too (RandomErasing does it).
OPERATIONS = ("auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add",
              "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x",
              "translate_y")
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def require_kornia(what: str) -> None:
    """Raise :class:`ConfigError` naming the ``aug`` extra when kornia is not installed."""
    try:
        import kornia  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} needs kornia, which is not installed: pip install 'dacnn[aug]' "
                          "(or pip install kornia)") from None


# ---------------------------------------------------------------------------------- RandAugment
@dataclass(frozen=True)
class RandAugmentSpec:
    """A timm RandAugment policy string, ``rand-m9-n2-mstd0.5-inc1`` (timm ``rand_augment_transform``):
    magnitude ``m`` (of 10), ``n`` operations per image, Gaussian magnitude noise ``mstd``, and
    ``inc1`` for the operations whose severity increases with the magnitude."""

    magnitude: float = 10.0
    num_layers: int = 2
    magnitude_std: float = 0.0
    increasing: bool = False

    @classmethod
    def parse(cls, text: str) -> RandAugmentSpec:
        parts = text.split("-")
        if parts[0] != "rand":
            raise ConfigError(f"RandAugment policy {text!r} must start with 'rand' "
                              "(e.g. rand-m9-mstd0.5-inc1)")
        values: dict[str, float | int | bool] = {}
        for part in parts[1:]:
            match = re.fullmatch(r"(mstd|inc|m|n)(\d+(?:\.\d+)?)", part)
            if match is None:
                raise ConfigError(f"RandAugment policy {text!r}: unknown section {part!r} (known: mM, nN, "
                                  "mstdS, inc0/inc1; timm's w and mmax are not supported)")
            key, val = match.groups()
            if key == "m":
                values["magnitude"] = float(val)
            elif key == "n":
                values["num_layers"] = int(float(val))
            elif key == "mstd":
                values["magnitude_std"] = float(val)
            else:
                values["increasing"] = bool(int(float(val)))
        spec = cls(**values)  # type: ignore[arg-type]
        if spec.num_layers < 1 or spec.magnitude_std > 100:
            raise ConfigError(f"RandAugment policy {text!r}: n must be >= 1 and mstd <= 100")
        return spec


@dataclass
class RandAugmentDraws:
    """Per layer and image (tensors of shape (layers, B)): which operation, whether it applies
    (timm's probability 0.5), its magnitude in [0, 1] (m / 10 with noise, clipped) and the sign of
    the symmetric ones."""

    op: torch.Tensor
    apply: torch.Tensor
    level: torch.Tensor
    negate: torch.Tensor

    def select(self, rows: slice) -> RandAugmentDraws:
        return RandAugmentDraws(self.op[:, rows], self.apply[:, rows], self.level[:, rows],
                                self.negate[:, rows])


def _signed(level: torch.Tensor, negate: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.where(negate, -scale * level, scale * level)


class RandAugment:
    """timm's RandAugment (Cubuk et al. 2020, arXiv 1909.13719) on float images in [0, 1].

    The operations and their level functions are timm's ``_RAND_TRANSFORMS`` (or
    ``_RAND_INCREASING_TRANSFORMS`` with ``inc1``) as PIL computes them: Brightness is ``x * f``
    (kornia's ``adjust_contrast``), Contrast blends with the grey mean, Color with the grey image;
    geometric operations are PIL's affine maps about the top-left corner (rotation about the
    centre), bicubic (ConvNeXt's ``--train_interpolation``) and filled with ``fill`` (timm's
    ``img_mean``). Each operation's output is rounded to 8-bit levels, as PIL's images are.
    """

    def __init__(self, spec: RandAugmentSpec, fill: Sequence[float]) -> None:
        require_kornia("rand_augment")
        self.spec = spec
        self.fill = tuple(float(v) for v in fill)
        self.ops: list[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = [
            getattr(self, f"_{name}") for name in OPERATIONS]
        self._geometric_ids = torch.tensor([OPERATIONS.index(name) for name in GEOMETRIC])

    def sample(self, batch: int, generator: torch.Generator) -> RandAugmentDraws:
        """timm's draws: ``n`` operations per image with replacement, each applied with probability
        0.5, magnitude ``N(m, mstd)`` clipped to [0, 10], a random sign for symmetric ones."""
        shape = (self.spec.num_layers, batch)
        dev = {"generator": generator, "device": generator.device}
        op = torch.randint(0, len(self.ops), shape, **dev)
        apply = torch.rand(shape, **dev) < 0.5
        level = torch.full(shape, self.spec.magnitude, dtype=torch.float32, device=generator.device)
        if self.spec.magnitude_std > 0:
            level = level + self.spec.magnitude_std * torch.randn(shape, **dev)
        level = level.clamp(0.0, _LEVEL_DENOM) / _LEVEL_DENOM
        negate = torch.rand(shape, **dev) > 0.5
        return RandAugmentDraws(op, apply, level, negate)

    def __call__(self, x: torch.Tensor, draws: RandAugmentDraws) -> torch.Tensor:
        """Apply the drawn operations to ``x`` (B, C, H, W), float in [0, 1]; returns a new tensor."""
        x = x.clone()
        for layer in range(draws.op.shape[0]):
            chosen = torch.where(draws.apply[layer], draws.op[layer], -1)
            for k, fn in enumerate(self.ops):
                if OPERATIONS[k] in GEOMETRIC:
                    continue
                rows = (chosen == k).nonzero().flatten()
                if rows.numel():
                    out = fn(x.index_select(0, rows), draws.level[layer, rows], draws.negate[layer, rows])
                    x.index_copy_(0, rows, out.mul_(255.0).round_().div_(255.0))
            geometric = torch.isin(chosen, self._geometric_ids.to(chosen.device)).nonzero().flatten()
            if geometric.numel():  # one warp for the five affine operations (most of the time is here)
                op, level = chosen[geometric], draws.level[layer, geometric]
                negate = draws.negate[layer, geometric]
                inverse = torch.zeros(geometric.numel(), 2, 3, device=x.device)
                for name in GEOMETRIC:
                    mine = op == OPERATIONS.index(name)
                    inverse[mine] = self._inverse(name, level[mine], negate[mine], x.shape[-2:])
                out = self._warp(x.index_select(0, geometric), inverse)
                x.index_copy_(0, geometric, out.mul_(255.0).round_().div_(255.0))
        return x

    # -- the operations: (images, level in [0, 1], sign) -> images, per timm's level functions
    def _enhance_factor(self, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
        if self.spec.increasing:  # timm _enhance_increasing_level_to_arg
            return (1.0 + _signed(level, negate, 0.9)).clamp(min=0.1)
        return level * 1.8 + 0.1  # _enhance_level_to_arg

    @staticmethod
    def _auto_contrast(x: torch.Tensor, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
        import kornia.enhance as ke
        lo, hi = x.amin((-2, -1), keepdim=True), x.amax((-2, -1), keepdim=True)
        return torch.where(hi > lo, ke.normalize_min_max(x), x)  # PIL leaves a flat channel as it is

    @staticmethod
    def _equalize(x: torch.Tensor, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
        import kornia.enhance as ke
        return ke.equalize(x)

    @staticmethod
    def _invert(x: torch.Tensor, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
        import kornia.enhance as ke
        return ke.invert(x)

    def _posterize(self, x: torch.Tensor, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
        import kornia.enhance as ke
        bits = (level * 4).long()  # bits kept: timm's int(m 4), or 4 - int(m 4) with inc1
        bits = 4 - bits if self.spec.increasing else bits
        return ke.posterize(x, bits)

    def _solarize(self, x: torch.Tensor, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
        import kornia.enhance as ke
        thresh = (level * 256).long()  # PIL inverts pixels >= thresh (0..256)
        thresh = 256 - thresh if self.spec.increasing else thresh
        out = ke.solarize(x, thresh.clamp(max=255).to(x.dtype) / 255.0)
        return torch.where((thresh > 255).view(-1, 1, 1, 1), x, out)

    @staticmethod
    def _solarize_add(x: torch.Tensor, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
        add = (level * 110).long().to(x.dtype).view(-1, 1, 1, 1) / 255.0  # timm: to pixels < 128 only
        return torch.where(x < 128 / 255.0, (x + add).clamp(max=1.0), x)

    def _color(self, x: torch.Tensor, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
        import kornia.enhance as ke
        return ke.adjust_saturation_with_gray_subtraction(x, self._enhance_factor(level, negate)).clamp(0, 1)

    def _contrast(self, x: torch.Tensor, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
        import kornia.enhance as ke
        return ke.adjust_contrast_with_mean_subtraction(x, self._enhance_factor(level, negate))

    def _brightness(self, x: torch.Tensor, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
        import kornia.enhance as ke
        return ke.adjust_contrast(x, self._enhance_factor(level, negate))  # x * f, clipped: PIL's Brightness

    def _sharpness(self, x: torch.Tensor, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
        import kornia.enhance as ke
        return ke.sharpness(x, self._enhance_factor(level, negate)).clamp(0, 1)

    def _warp(self, x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        """PIL ``Image.transform(AFFINE, inverse)``: output pixel (u, v) samples the input at
        ``inverse @ (u + 1/2, v + 1/2, 1)`` in PIL's corner coordinates; kornia wants the forward map
        in pixel-centre coordinates."""
        import kornia.geometry.transform as kt
        b = x.shape[0]
        shift = torch.eye(3, dtype=x.dtype, device=x.device).repeat(b, 1, 1)
        shift[:, :2, 2] = 0.5
        full = torch.eye(3, dtype=x.dtype, device=x.device).repeat(b, 1, 1)
        full[:, :2] = inverse.to(x.dtype)
        centred = torch.linalg.inv(shift) @ full @ shift  # pixel-centre coordinates
        forward = torch.linalg.inv(centred)[:, :2]
        fill = torch.tensor(self.fill, dtype=x.dtype, device=x.device)
        return kt.warp_affine(x, forward, tuple(x.shape[-2:]), mode="bicubic", padding_mode="fill",
                              fill_value=fill).clamp(0, 1)

    def _rotate(self, x: torch.Tensor, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
        return self._warp(x, self._inverse("rotate", level, negate, x.shape[-2:]))

    def _shear_x(self, x: torch.Tensor, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
        return self._warp(x, self._inverse("shear_x", level, negate, x.shape[-2:]))

    def _shear_y(self, x: torch.Tensor, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
        return self._warp(x, self._inverse("shear_y", level, negate, x.shape[-2:]))

    def _translate_x(self, x: torch.Tensor, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
        return self._warp(x, self._inverse("translate_x", level, negate, x.shape[-2:]))

    def _translate_y(self, x: torch.Tensor, level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
        return self._warp(x, self._inverse("translate_y", level, negate, x.shape[-2:]))

    @staticmethod
    def _inverse(name: str, level: torch.Tensor, negate: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
        """PIL's inverse affine map (n, 2, 3) of a geometric operation (timm's level functions)."""
        h, w = hw
        inverse = torch.zeros(level.shape[0], 2, 3, device=level.device)
        inverse[:, 0, 0] = inverse[:, 1, 1] = 1.0
        if name == "rotate":  # PIL rotates counter-clockwise about the centre; 30 degrees at m10
            theta = -torch.deg2rad(_signed(level, negate, 30.0))
            cos, sin = torch.cos(theta), torch.sin(theta)
            cx, cy = w / 2.0, h / 2.0
            inverse[:, 0, 0], inverse[:, 0, 1], inverse[:, 0, 2] = cos, sin, cx - cos * cx - sin * cy
            inverse[:, 1, 0], inverse[:, 1, 1], inverse[:, 1, 2] = -sin, cos, cy + sin * cx - cos * cy
        elif name == "shear_x":  # about the top-left corner, factor 0.3 at m10
            inverse[:, 0, 1] = _signed(level, negate, 0.3)
        elif name == "shear_y":
            inverse[:, 1, 0] = _signed(level, negate, 0.3)
        elif name == "translate_x":  # timm's TranslateXRel: 45 % of the width at m10
            inverse[:, 0, 2] = _signed(level, negate, 0.45) * w
        else:
            inverse[:, 1, 2] = _signed(level, negate, 0.45) * h
        return inverse


# ---------------------------------------------------------------------------------- RandomErasing
@dataclass
class ErasingDraws:
    """One box per image (Zhong et al. 2017, arXiv 1708.04896; timm ``RandomErasing``, mode pixel):
    whether it is erased, the box (top, left, height, width) and its noise (B, C, H, W)."""

    erase: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    noise: torch.Tensor

    def select(self, rows: slice) -> ErasingDraws:
        return ErasingDraws(self.erase[rows], self.top[rows], self.left[rows], self.height[rows],
                            self.width[rows], self.noise[rows])


def sample_erasing(p: float, shape: tuple[int, int, int, int], generator: torch.Generator,
                   attempts: int = 10) -> ErasingDraws:
    """timm's draws: with probability ``p`` an image gets one box of area U(0.02, 1/3) of the image
    and log-uniform aspect ratio in (0.3, 1/0.3), the first of ``attempts`` that fits; the box is
    filled with N(0, 1) noise (in normalised units)."""
    b, c, h, w = shape
    dev = {"generator": generator, "device": generator.device}
    erase = torch.rand(b, **dev) < p
    area = (0.02 + (1 / 3 - 0.02) * torch.rand(b, attempts, **dev)) * (h * w)
    log_ratio = math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * torch.rand(b, attempts, **dev)
    ratio = log_ratio.exp()
    bh = (area * ratio).sqrt().round().long()
    bw = (area / ratio).sqrt().round().long()
    fits = (bh < h) & (bw < w)
    first = fits.long().argmax(1, keepdim=True)  # the first attempt that fits (timm breaks there)
    bh, bw = bh.gather(1, first).squeeze(1), bw.gather(1, first).squeeze(1)
    erase &= fits.any(1)
    top = (torch.rand(b, **dev) * (h - bh + 1)).floor().long().clamp(max=h - 1)  # randint(0, h - bh)
    left = (torch.rand(b, **dev) * (w - bw + 1)).floor().long().clamp(max=w - 1)
    noise = torch.randn(shape, **dev)
    return ErasingDraws(erase, top, left, bh, bw, noise)


def random_erasing(x: torch.Tensor, draws: ErasingDraws) -> torch.Tensor:
    """``x`` (normalised images) with each drawn box filled with its noise."""
    h, w = x.shape[-2:]
    dev = x.device
    rows = torch.arange(h, device=dev)[None, :]
    cols = torch.arange(w, device=dev)[None, :]
    top, left = draws.top.to(dev)[:, None], draws.left.to(dev)[:, None]
    in_rows = (rows >= top) & (rows < top + draws.height.to(dev)[:, None])
    in_cols = (cols >= left) & (cols < left + draws.width.to(dev)[:, None])
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & draws.erase.to(dev)[:, None, None])[:, None]
    return torch.where(mask, draws.noise.to(dev, x.dtype), x)


# ---------------------------------------------------------------------------------- Mixup / CutMix
@dataclass(frozen=True)
class MixSpec:
    """timm's ``Mixup`` in mode "batch" (mixup: Zhang et al. 2018, arXiv 1710.09412; CutMix: Yun et al.
    2019, arXiv 1905.04899): one lambda per batch from Beta(alpha, alpha); with both alphas set a
    batch uses CutMix with probability ``switch_prob``; CutMix's lambda is corrected to the box's
    area; targets are label-smoothed one-hots mixed with the same lambda."""

    mixup: float | None = None
    cutmix: float | None = None
    num_classes: int = 10
    label_smoothing: float = 0.0
    switch_prob: float = 0.5

    def __post_init__(self) -> None:
        if not (self.mixup or self.cutmix):
            raise ConfigError("MixSpec needs a mixup or a cutmix alpha")


def soft_targets(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """timm's ``one_hot`` with smoothing: ``1 - s + s/K`` on the class, ``s/K`` elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((y.shape[0], num_classes), off, device=y.device)
    return targets.scatter_(1, y[:, None], 1 - smoothing + off)


def mix_batch(x: torch.Tensor, y: torch.Tensor, spec: MixSpec,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix ``x`` (B, C, H, W) with ``x.flip(0)``; returns the images and (B, K) soft targets summing to 1.

    The batch's draws (kind, lambda, box) come from ``rng`` on the host, as timm's ``np.random``."""
    use_cutmix = bool(spec.cutmix) and (not spec.mixup or rng.random() < spec.switch_prob)
    alpha = spec.cutmix if use_cutmix else spec.mixup
    lam = float(rng.beta(alpha, alpha))
    h, w = x.shape[-2:]
    if use_cutmix:  # timm rand_bbox + cutmix_bbox_and_lam(correct_lam=True)
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        yl, yh = int(np.clip(cy - cut_h // 2, 0, h)), int(np.clip(cy + cut_h // 2, 0, h))
        xl, xh = int(np.clip(cx - cut_w // 2, 0, w)), int(np.clip(cx + cut_w // 2, 0, w))
        lam = 1.0 - (yh - yl) * (xh - xl) / float(h * w)
        x = x.clone()
        x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
    else:
        x = torch.lerp(x.flip(0), x, lam)  # lam x + (1 - lam) x.flip(0)
    one_hot = soft_targets(y, spec.num_classes, spec.label_smoothing)
    return x, lam * one_hot + (1.0 - lam) * one_hot.flip(0)

