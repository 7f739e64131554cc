"""Batched augmentation on the device, all as one pixel gather per batch.

Random crop with zero padding, horizontal flip and nearest-neighbour rotation are each a map from
output pixel to source pixel, so their composition is one index tensor: the batch is gathered
once, in uint8, straight from the padded images (airbench-style: pad once, shift per image, no
per-image Python). Order as in LruNet's recipe (SPEC 2.2): RandomCrop(size, padding) ->
RandomRotation(+-degrees, nearest, fill 0) -> RandomHorizontalFlip. airbench's translation is the
same crop from reflect-padded images, and its alternating flip flips a seeded half of the images in
even epochs and the other half in odd ones (:meth:`DeviceLoader`). Cutout (DeVries & Taylor
2017, square of zeros centred anywhere, clipped at the border) comes after normalisation, as in
airbench, so it fills with the dataset mean. timm's RandAugment (after the crop and flip, as
timm's ``create_transform``) and RandomErasing (after normalisation) are in
:mod:`dacnn.data.batch_augment`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dacnn.errors import ConfigError


@dataclass(frozen=True)
class Augment:
    """Training augmentation; the defaults are none, as ``TrainConfig``'s (the recipes set them:
    CIFAR's crop 4 + flip, :meth:`lrunet`)."""

    crop_padding: int = 0
    flip: bool = False
    rotate_degrees: float = 0.0
    cutout: int = 0
    translate: int = 0  # a random crop as crop_padding, from reflect-padded images (airbench)
    alternate_flip: bool = False  # with flip: each image flips every other epoch (airbench)
    rand_augment: str | None = None  # timm policy, e.g. "rand-m9-mstd0.5-inc1" (dacnn.data.batch_augment)
    random_erasing: float = 0.0  # probability of timm's RandomErasing per image (after normalisation)

    def __post_init__(self) -> None:
        if self.crop_padding < 0 or self.cutout < 0 or self.rotate_degrees < 0 or self.translate < 0:
            raise ConfigError(f"Augment values must be >= 0, got {self}")
        if self.translate and self.crop_padding:
            raise ConfigError(f"Augment: translate and crop_padding are two random crops; set one: {self}")
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ConfigError(f"Augment: random_erasing is a probability, got {self.random_erasing}")

    @property
    def padding(self) -> int:
        """Pixels of room the random crop needs on each side (zero or reflect padded)."""
        return self.crop_padding or self.translate

    @property
    def spatial(self) -> bool:
        """Whether the augmentation moves pixels (one gather per batch)."""
        return bool(self.padding or self.flip or self.rotate_degrees)

    @classmethod
    def lrunet(cls) -> Augment:
        """LruNet's recipe: RandomCrop(32, padding 4), RandomRotation(10), flip (SPEC 2.2)."""
        return cls(crop_padding=4, flip=True, rotate_degrees=10.0, cutout=0)

    @property
    def is_identity(self) -> bool:
        return not (self.spatial or self.cutout or self.rand_augment or self.random_erasing)


@dataclass
class AugmentParams:
    """Per-image random draws for one batch (tensors of shape (B,) on the generator's device, None
    where unused)."""

    top: torch.Tensor  # crop window row in the stored (padded) image
    left: torch.Tensor
    flip: torch.Tensor | None
    angle: torch.Tensor | None  # radians
    cutout_center: tuple[torch.Tensor, torch.Tensor] | None

    def select(self, rows: slice) -> AugmentParams:
        """The draws of the images ``rows`` (a DDP rank's part ``[rank::world]`` of the batch)."""
        cut = self.cutout_center
        return AugmentParams(self.top[rows], self.left[rows],
                             self.flip[rows] if self.flip is not None else None,
                             self.angle[rows] if self.angle is not None else None,
                             (cut[0][rows], cut[1][rows]) if cut is not None else None)


def sample_params(augment: Augment, batch: int, ranges: tuple[tuple[int, int], tuple[int, int]],
                  out_hw: tuple[int, int], generator: torch.Generator) -> AugmentParams:
    """Draw one batch's parameters; the crop window's top/left are uniform in ``ranges`` (inclusive).

    Drawn on the generator's device: a CUDA generator keeps the draws on the GPU (no host copy, no
    synchronisation), a CPU generator on the CPU; each is seeded, so either is reproducible.
    """
    (top_lo, top_hi), (left_lo, left_hi) = ranges
    dev = {"generator": generator, "device": generator.device}
    if augment.padding:
        top = torch.randint(top_lo, top_hi + 1, (batch,), **dev)
        left = torch.randint(left_lo, left_hi + 1, (batch,), **dev)
    else:
        top = torch.full((batch,), top_lo, dtype=torch.int64, device=generator.device)
        left = torch.full((batch,), left_lo, dtype=torch.int64, device=generator.device)
    flip = torch.rand(batch, **dev) < 0.5 if augment.flip else None
    angle = None
    if augment.rotate_degrees:
        angle = (torch.rand(batch, dtype=torch.float64, **dev) * 2 - 1) * math.radians(augment.rotate_degrees)
    cut = None
    if augment.cutout:
        cut = (torch.randint(0, out_hw[0], (batch,), **dev), torch.randint(0, out_hw[1], (batch,), **dev))
    return AugmentParams(top, left, flip, angle, cut)


def spatial_index(params: AugmentParams, out_hw: tuple[int, int], stored_w: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat source index (B, Ho*Wo) into each stored image, and the in-window mask for rotation."""
    height, width = out_hw
    top = params.top.to(device)
    left = params.left.to(device)
    batch = top.shape[0]
    if params.angle is None:
        row_starts = (top[:, None] + torch.arange(height, device=device)) * stored_w  # (B, Ho)
        cols = torch.arange(width, device=device).expand(batch, width)
        if params.flip is not None:
            cols = torch.where(params.flip.to(device)[:, None], (width - 1) - cols, cols)
        cols = cols + left[:, None]
        return (row_starts[:, :, None] + cols[:, None, :]).reshape(batch, height * width), None
    # Rotation about the window centre, counter-clockwise for a positive angle as in torchvision:
    # output pixel (i, j) reads window pixel R(angle) (i - ci, j' - cj) + c rounded to the nearest
    # pixel (torchvision's default NEAREST); j' mirrors j when the image is flipped.
    ci, cj = (height - 1) / 2, (width - 1) / 2
    f32 = torch.float32
    di = (torch.arange(height, device=device, dtype=f32) - ci).view(1, height, 1)
    dj = (torch.arange(width, device=device, dtype=f32) - cj).view(1, 1, width)
    if params.flip is not None:
        dj = dj * (1.0 - 2.0 * params.flip.to(device=device, dtype=f32).view(batch, 1, 1))
    cos = torch.cos(params.angle).to(device=device, dtype=f32).view(batch, 1, 1)
    sin = torch.sin(params.angle).to(device=device, dtype=f32).view(batch, 1, 1)
    src_i = torch.add(cos * di + ci, sin * dj).round_()  # (B, Ho, Wo), only these ops are full size
    src_j = torch.add(cj - sin * di, cos * dj).round_()
    in_i = src_i.clamp(0, height - 1)
    in_j = src_j.clamp(0, width - 1)
    valid = (in_i == src_i).logical_and_(in_j == src_j)
    base = (top * stored_w + left).to(f32).view(batch, 1, 1)
    flat = torch.addcmul(in_j.add_(base), in_i, torch.tensor(float(stored_w), device=device)).long()
    return flat.reshape(batch, height * width), valid.reshape(batch, 1, height * width)


def gather_pixels(images: torch.Tensor, flat: torch.Tensor, valid: torch.Tensor | None,
                  out_hw: tuple[int, int]) -> torch.Tensor:
    """Gather (B, C, Ho, Wo) from stored images (B, C, Hs, Ws) by flat index; outside ``valid`` -> 0."""
    batch, channels = images.shape[:2]
    index = flat[:, None, :].expand(batch, channels, flat.shape[1])
    out = images.reshape(batch, channels, -1).gather(2, index)
    if valid is not None:
        out.masked_fill_(~valid, 0)
    return out.view(batch, channels, *out_hw)


def cutout_mask(params: AugmentParams, size: int, out_hw: tuple[int, int],
                device: torch.device) -> torch.Tensor:
    """Boolean (B, 1, Ho, Wo) mask of each image's cutout square (size x size, clipped at the border)."""
    assert params.cutout_center is not None
    cy, cx = (c.to(device) for c in params.cutout_center)
    y0, x0 = cy - size // 2, cx - size // 2
    rows = torch.arange(out_hw[0], device=device)[None, :]
    cols = torch.arange(out_hw[1], device=device)[None, :]
    in_rows = (rows >= y0[:, None]) & (rows < (y0 + size)[:, None])  # (B, Ho)
    in_cols = (cols >= x0[:, None]) & (cols < (x0 + size)[:, None])  # (B, Wo)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
