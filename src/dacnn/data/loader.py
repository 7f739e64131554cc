"""``DeviceLoader``: the whole split as one uint8 tensor on the device, batches by index.

No worker processes and no per-image Python (airbench's design, STYLE.md): each batch is an
``index_select`` of a seeded permutation, one pixel gather for crop/flip/rotation, one cast and
one fused per-channel affine for normalisation. The order and the augmentation of epoch ``e`` depend
only on ``(seed, e)`` (RandAugment, RandomErasing and Mixup/CutMix, :mod:`dacnn.data.batch_augment`,
on ``(seed, e, batch)``); ``set_epoch(e)`` picks the epoch, otherwise each pass advances by one, and
``set_epoch(e, start_batch=b)`` starts that pass at batch ``b`` with the batches of a whole pass (a
resumed run continues mid-epoch without building the batches it skips).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dacnn.data.augment import (
    Augment,
    AugmentParams,
    cutout_mask,
    gather_pixels,
    sample_params,
    spatial_index,
)
from dacnn.data.batch_augment import (
    ErasingDraws,
    MixSpec,
    RandAugment,
    RandAugmentDraws,
    RandAugmentSpec,
    mix_batch,
    random_erasing,
    sample_erasing,
)
from dacnn.data.catalog import DATASETS
from dacnn.data.split import DatasetSplit
from dacnn.errors import ConfigError

_ORDER_STREAM, _AUGMENT_STREAM, _FLIP_STREAM, _BATCH_STREAM, _MIX_STREAM = 0, 1, 2, 3, 4


def reflect_pad(images: torch.Tensor, pad: int) -> torch.Tensor:
    """``F.pad(images, (pad,) * 4, "reflect")`` for any dtype (uint8 included), by one index per axis."""
    if pad == 0:
        return images
    h, w = images.shape[-2:]
    if pad >= min(h, w):
        raise ConfigError(f"translate={pad} needs images larger than {pad} pixels, got {h}x{w}")

    def index(n: int) -> torch.Tensor:
        i = torch.arange(-pad, n + pad, device=images.device).abs()
        return torch.where(i > n - 1, 2 * (n - 1) - i, i)

    return images.index_select(-2, index(h)).index_select(-1, index(w))


def _generator(seed: int, epoch: int, stream: int, device: torch.device | None = None,
               batch: int | None = None) -> torch.Generator:
    key = [seed, epoch, stream] + ([] if batch is None else [batch])
    state = np.random.SeedSequence(key).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device or "cpu").manual_seed(int(state) & ((1 << 63) - 1))


BatchDraws = tuple[RandAugmentDraws | None, ErasingDraws | None]


def split_mean_std(split: DatasetSplit) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std (0..1 units): the catalogue's for known datasets, else measured."""
    info = DATASETS.get(split.name)
    if info is not None and len(info.mean) == split.image_shape[2]:
        return info.mean, info.std
    sample = split.images[:: max(1, len(split) // 10000)].astype(np.float64) / 255.0
    return tuple(sample.mean(axis=(0, 1, 2))), tuple(sample.std(axis=(0, 1, 2)) + 1e-8)


class DeviceLoader:
    """Iterate ``(x, y)``: x float (B, C, H, W) on ``device``, y int64 (B,).

    ``normalize=True`` applies the dataset's mean/std (``mean``/``std`` override it); ``False``
    gives pixels/255 as LruNet trains. ``pad_to`` zero-pads smaller images (Fashion-MNIST 28x28)
    to ``pad_to`` x ``pad_to``: centred without augmentation; with ``crop_padding=p`` the crop is
    torchvision's RandomCrop(pad_to, padding=p), LruNet's Fashion-MNIST recipe (SPEC 2.2).
    ``cpu_threads``: torch threads while a CPU batch is built (restored afterwards). These ops are
    memory-bound and small; one thread avoids OpenMP barrier stalls when the cores are shared
    (measured 30x faster under load); ``None`` keeps torch's setting.

    The augmentation draws come from a generator on ``device`` (on a GPU: no host round trip per
    batch); the order is drawn on the CPU once per epoch, so it is the same on every device.
    ``rank``/``world`` (DDP): each batch is this rank's part ``[rank::world]`` of the global batch of
    ``batch_size`` images; the draws are those of the global batch, so the images a rank gets do
    not depend on the number of ranks, and each rank gathers and augments only its own images.
    ``mix`` (Mixup/CutMix) mixes each rank's part within itself and yields (B, K) soft targets.
    """

    def __init__(self, split: DatasetSplit, batch_size: int = 256, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, device: str | torch.device = "cpu",
                 augment: Augment | None = None, normalize: bool = True, pad_to: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 dtype: torch.dtype = torch.float32, cpu_threads: int | None = 1, rank: int = 0,
                 world: int = 1, mix: MixSpec | None = None) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is outside a world of {world} processes")
        self.rank, self.world = rank, world
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.device = torch.device(device)
        self.augment = augment if augment is not None and not augment.is_identity else None
        self.normalize = normalize
        self.dtype = dtype
        self.cpu_threads = cpu_threads
        self.epoch = 0
        self._next_epoch = 0
        self._start_batch = 0
        height, width, channels = split.image_shape
        out_h, out_w = (pad_to, pad_to) if pad_to else (height, width)
        if out_h < height or out_w < width:
            raise ConfigError(f"pad_to={pad_to} is smaller than the {height}x{width} images of {split.name}")
        self.out_hw = (out_h, out_w)
        images = torch.from_numpy(split.images).to(self.device).permute(0, 3, 1, 2)
        extra_h, extra_w = out_h - height, out_w - width
        if self.augment is None:  # centred padding only
            lo_h, lo_w = extra_h // 2, extra_w // 2
            images = F.pad(images, (lo_w, extra_w - lo_w, lo_h, extra_h - lo_h))
            self._ranges = ((0, 0), (0, 0))
        else:
            pad = self.augment.padding
            if pad and (height + 2 * pad < out_h or width + 2 * pad < out_w):
                raise ConfigError(f"crop_padding={pad} cannot fill a {out_h}x{out_w} crop of "
                                  f"{height}x{width} images")
            # Pad once by q: room for every crop window [-p, H+p-S] and for the centred window
            # (translate: the first p pixels are reflected, the rest zeros).
            q_h, q_w = max(pad, extra_h - extra_h // 2), max(pad, extra_w - extra_w // 2)
            reflected = self.augment.translate
            images = F.pad(reflect_pad(images, reflected),
                           (q_w - reflected, q_w - reflected, q_h - reflected, q_h - reflected))
            if pad:
                self._ranges = ((q_h - pad, q_h + height + pad - out_h),
                                (q_w - pad, q_w + width + pad - out_w))
            else:
                self._ranges = ((q_h - extra_h // 2,) * 2, (q_w - extra_w // 2,) * 2)
        self.images = images.contiguous()  # uint8 (N, C, Hs, Ws), padded once
        self._flip_base = None  # alternating flip: which images flip in even epochs
        if self.augment is not None and self.augment.flip and self.augment.alternate_flip:
            gen = _generator(seed, 0, _FLIP_STREAM, self.device)
            self._flip_base = torch.rand(len(split), generator=gen, device=self.device) < 0.5
        self.labels = torch.from_numpy(split.labels).to(self.device)
        self.mix = mix
        m, s = (mean, std) if mean is not None and std is not None else split_mean_std(split)
        policy = self.augment.rand_augment if self.augment is not None else None
        # timm fills RandAugment's geometric operations with the normalisation mean (its img_mean)
        self._rand_augment = RandAugment(RandAugmentSpec.parse(policy), m) if policy else None
        if normalize:
            if len(m) != channels or len(s) != channels:
                raise ConfigError(f"mean/std have {len(m)}/{len(s)} values for {channels}-channel images")
            scale = [1.0 / (255.0 * v) for v in s]
            shift = [-mu / v for mu, v in zip(m, s, strict=True)]
        else:
            scale, shift = [1.0 / 255.0] * channels, [0.0] * channels
        self._scale = torch.tensor(scale, dtype=dtype, device=self.device).view(1, channels, 1, 1)
        self._shift = torch.tensor(shift, dtype=dtype, device=self.device).view(1, channels, 1, 1)

    @property
    def num_samples(self) -> int:
        return len(self.split)

    @property
    def num_classes(self) -> int:
        return self.split.num_classes

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the batches."""
        return (self.split.image_shape[2], *self.out_hw)

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next pass epoch ``epoch`` (its order and augmentation depend on seed and epoch only),
        starting at batch ``start_batch``: the batches before it are not built, only their random draws
        are made, so the rest are those of the whole pass."""
        if not 0 <= start_batch <= len(self):
            raise ConfigError(f"start_batch {start_batch} is outside the {len(self)} batches of an epoch")
        self._next_epoch, self._start_batch = int(epoch), int(start_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.epoch = self._next_epoch
        self._next_epoch = self.epoch + 1
        n = len(self.split)
        if self.shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, self.epoch, _ORDER_STREAM))
        else:
            order = torch.arange(n)
        order = order.to(self.device)
        augment_gen = _generator(self.seed, self.epoch, _AUGMENT_STREAM, self.device)
        mine = slice(self.rank, None, self.world)
        skip, self._start_batch = self._start_batch, 0
        for b, start in enumerate(range(0, len(self) * self.batch_size, self.batch_size)):
            index = order[start: start + self.batch_size]
            params = None
            if self.augment is not None:  # the global batch's draws, then this rank's part of them
                params = sample_params(self.augment, index.shape[0], self._ranges, self.out_hw, augment_gen)
                if self._flip_base is not None:
                    params.flip = self._flip_base.index_select(0, index) ^ bool(self.epoch % 2)
            if b < skip:  # positioned past this batch: its draws are made, its pixels are not
                continue
            draws = self._batch_draws(b, index.shape[0])
            if self.world > 1:
                index = index[mine]
                params = params.select(mine) if params is not None else None
                ra, erasing = draws
                draws = (ra.select(mine) if ra is not None else None,
                         erasing.select(mine) if erasing is not None else None)
            yield self._batch(index, params, draws, b)

    def _batch_draws(self, batch: int, size: int) -> BatchDraws:
        """RandAugment's and RandomErasing's draws for the global batch ``batch``: a function of
        (seed, epoch, batch) only, so a resumed run needs none of the batches before it."""
        augment = self.augment
        if self._rand_augment is None and (augment is None or not augment.random_erasing):
            return None, None
        gen = _generator(self.seed, self.epoch, _BATCH_STREAM, self.device, batch=batch)
        ra = self._rand_augment.sample(size, gen) if self._rand_augment is not None else None
        erasing = None
        if augment is not None and augment.random_erasing:
            erasing = sample_erasing(augment.random_erasing, (size, *self.output_shape), gen)
        return ra, erasing

    def plain_images(self, count: int) -> torch.Tensor:
        """The first ``count`` images of the split as the model sees them, without augmentation."""
        (top_lo, top_hi), (left_lo, left_hi) = self._ranges  # the centred window: the middle of the range
        top, left = (top_lo + top_hi) // 2, (left_lo + left_hi) // 2
        pixels = self.images[:count, :, top: top + self.out_hw[0], left: left + self.out_hw[1]]
        return pixels.to(self.dtype).mul_(self._scale).add_(self._shift)

    def _batch(self, index: torch.Tensor, params: AugmentParams | None, draws: BatchDraws,
               batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        threads = torch.get_num_threads()
        if self.device.type != "cpu" or not self.cpu_threads or self.cpu_threads == threads:
            return self._make_batch(index, params, draws, batch)
        torch.set_num_threads(self.cpu_threads)
        try:
            return self._make_batch(index, params, draws, batch)
        finally:
            torch.set_num_threads(threads)

    def _make_batch(self, index: torch.Tensor, params: AugmentParams | None, draws: BatchDraws,
                    batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self.images.index_select(0, index)
        augment = self.augment
        if augment is not None:
            assert params is not None
            if augment.spatial:
                flat, valid = spatial_index(params, self.out_hw, self.images.shape[3], self.device)
                pixels = gather_pixels(pixels, flat, valid, self.out_hw)
            else:
                (top, _), (left, _) = self._ranges
                pixels = pixels[:, :, top: top + self.out_hw[0], left: left + self.out_hw[1]]
        ra_draws, erasing = draws
        if self._rand_augment is not None:  # on [0, 1] images; its output is on 8-bit levels again
            assert ra_draws is not None
            pixels = self._rand_augment(pixels.to(self.dtype).div_(255.0), ra_draws).mul_(255.0)
        x = pixels.to(self.dtype).mul_(self._scale).add_(self._shift)
        if augment is not None and augment.cutout:
            assert params is not None
            x.masked_fill_(cutout_mask(params, augment.cutout, self.out_hw, self.device), 0.0)
        if erasing is not None:
            x = random_erasing(x, erasing)
        y = self.labels.index_select(0, index)
        if self.mix is not None:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, _MIX_STREAM, batch]))
            x, y = mix_batch(x, y, self.mix, rng)
        return x, y
