"""Turn a :class:`~dacnn.train.config.TrainConfig` into the run's parts: device, data, model, optimizer, LR.

Each builder maps library errors to :class:`ConfigError` naming the offending field, so the CLI
reports them in one line.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dacnn.data import DATASETS, Augment, DeviceLoader, load_dataset
from dacnn.data.batch_augment import MixSpec
from dacnn.errors import ConfigError
from dacnn.registry import create_model, model_info
from dacnn.train.config import TrainConfig
from dacnn.train.distributed import DistContext
from dacnn.train.optim import param_groups

__all__ = ["dataset_info", "resolve_device", "seed_everything", "set_deterministic",
           "deterministic_mode", "DeterministicMode", "RunData", "build_data",
           "build_model", "build_optimizer", "LRSchedule"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU -> ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"field 'device': unknown device {name!r} (cpu, cuda, cuda:N, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"field 'device' is {name!r} but no CUDA GPU is available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class DeterministicMode:
    """What ``--deterministic`` sets on a device: ``torch.use_deterministic_algorithms(enabled,
    warn_only=warn_only)``, cuDNN's deterministic flag, and the warning to show (or ``None``)."""

    enabled: bool
    warn_only: bool = False
    warning: str | None = None


# Ops a registered model runs whose CUDA backward has no deterministic kernel (torch raises there
# under use_deterministic_algorithms(True)): every classifier head's global average pooling.
CUDA_NONDETERMINISTIC_OPS = ("AdaptiveAvgPool2d backward (adaptive_avg_pool2d_backward_cuda)",)


def deterministic_mode(enabled: bool, device_type: str) -> DeterministicMode:
    """The deterministic settings of a run on ``device_type``: on a CPU every op is deterministic;
    on CUDA torch would raise at the first backward through :data:`CUDA_NONDETERMINISTIC_OPS`, so
    deterministic kernels are used wherever they exist and the others only warn (a warning says the
    run is then not bitwise reproducible)."""
    if not enabled:
        return DeterministicMode(False)
    if device_type != "cuda":
        return DeterministicMode(True)
    return DeterministicMode(True, warn_only=True, warning=(
        "--deterministic on CUDA: deterministic kernels and cuDNN algorithms are used where they exist, "
        f"but {', '.join(CUDA_NONDETERMINISTIC_OPS)} (and any other op without one) has none, so torch "
        "warns there instead of stopping, and the run is not bitwise reproducible (it is on a CPU)"))


def set_deterministic(enabled: bool, device: torch.device | str = "cpu") -> DeterministicMode:
    """Deterministic algorithms (bitwise-reproducible runs on CPU; on CUDA see
    :func:`deterministic_mode`) or cuDNN autotuning; returns what was set (its warning is issued)."""
    mode = deterministic_mode(enabled, torch.device(device).type)
    if mode.enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(mode.enabled, warn_only=mode.warn_only)
    torch.backends.cudnn.deterministic = mode.enabled
    torch.backends.cudnn.benchmark = not mode.enabled
    if mode.warning:
        warnings.warn(mode.warning, stacklevel=2)
    return mode


@dataclass
class RunData:
    """Loaders of the run and what the model needs to know about the data."""

    train: Any
    val: Any | None
    test: Any | None
    num_classes: int
    in_chans: int
    pad_to: int | None
    train_size: int


def dataset_info(name: str | None) -> Any:
    """``DATASETS[name]``, or a :class:`ConfigError` listing the known names."""

    if name is None:
        raise ConfigError("no dataset given: use --dataset NAME or a recipe that sets one")
    if name not in DATASETS:
        raise ConfigError(f"field 'dataset': unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    return DATASETS[name]


def build_data(cfg: TrainConfig, device: torch.device, model_hw: int | None,
               ctx: DistContext | None = None) -> RunData:
    """Load the dataset, hold out ``val_size``, take ``train_subset``, make the device loaders.

    Under DDP (``ctx``) the training loader yields this rank's part of each global batch.

    The validation split and the subset use seed 0 whatever ``cfg.seed`` is, so runs with different
    seeds see the same data; ``cfg.seed`` sets the order and augmentation. With mixup/CutMix the
    training loader yields soft targets with the label smoothing in them (timm's ``Mixup``).
    """

    info = dataset_info(cfg.dataset)
    full = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir)
    val = None
    if cfg.val_size:
        if cfg.val_size >= len(full):
            raise ConfigError(f"field 'val_size' {cfg.val_size} leaves no training images "
                              f"({len(full)} in all)")
        full, val = full.train_val_split(val_size=cfg.val_size, seed=0)
    train = full
    if cfg.train_subset is not None:
        if cfg.train_subset > len(full):
            raise ConfigError(f"field 'train_subset' {cfg.train_subset} exceeds the {len(full)} "
                              "training images")
        train = full.subset(cfg.train_subset, seed=0)
    if len(train) < cfg.batch_size:
        raise ConfigError(f"field 'batch_size' {cfg.batch_size} exceeds the {len(train)} training images")
    pad_to = info.pad_for(model_hw, cfg.pad_to)
    augment = Augment(crop_padding=cfg.crop_padding, flip=cfg.flip, rotate_degrees=cfg.rotate_degrees,
                      cutout=cfg.cutout, translate=cfg.translate, alternate_flip=cfg.alternate_flip,
                      rand_augment=cfg.rand_augment, random_erasing=cfg.random_erasing or 0.0)
    mix = (MixSpec(mixup=cfg.mixup, cutmix=cfg.cutmix, num_classes=info.num_classes,
                   label_smoothing=cfg.label_smoothing) if cfg.mixup or cfg.cutmix else None)
    common = {"device": device, "normalize": cfg.normalize, "pad_to": pad_to}
    ctx = ctx or DistContext()
    train_loader = DeviceLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=True, seed=cfg.seed,
                                augment=augment, rank=ctx.rank, world=ctx.world, mix=mix, **common)

    def eval_loader(split: Any) -> Any:
        return DeviceLoader(split, batch_size=cfg.eval_batch_size, shuffle=False, drop_last=False, seed=0,
                            augment=None, **common)

    test = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir) if cfg.eval_test else None
    return RunData(
        train=train_loader,
        val=eval_loader(val) if val is not None else None,
        test=eval_loader(test) if test is not None else None,
        num_classes=info.num_classes,
        in_chans=info.image_size[2],
        pad_to=pad_to,
        train_size=len(train),
    )


def model_kwargs(cfg: TrainConfig, num_classes: int, in_chans: int) -> dict[str, Any]:
    """The ``create_model`` keyword arguments of a run (``None`` dropped), as stored in sidecars."""
    kwargs = {"num_classes": num_classes, "in_chans": in_chans, "width": cfg.width, "depth": cfg.depth,
              **cfg.model_kwargs}
    return {k: v for k, v in kwargs.items() if v is not None}


def build_model(name: str | None, kwargs: dict[str, Any]) -> nn.Module:
    """``create_model`` with its errors turned into :class:`ConfigError`."""

    if name is None:
        raise ConfigError("no model given: use --model NAME (see `dacnn models`) or a recipe that sets one")
    try:
        return create_model(name, **kwargs)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0]) if exc.args else f"unknown model {name!r}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model {name!r} rejects its arguments {kwargs}: {exc}") from None


def model_input_hw(name: str | None) -> int | None:
    """Input height the registered model is designed for (to pad smaller images), if known."""

    if name is None:
        return None
    try:
        return model_info(name).input_size[1]
    except KeyError:
        return None


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD / Adagrad / Adam / AdamW over deduplicated parameters (each shared tensor once)."""

    groups = param_groups(model, cfg.weight_decay, decay_1d=cfg.decay_norm_and_bias,
                          norm_bias_lr_scale=cfg.norm_bias_lr_scale,
                          decoupled_lr=cfg.lr if cfg.decoupled_weight_decay else None)
    eps = {} if cfg.eps is None else {"eps": cfg.eps}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(groups, lr=cfg.lr, **eps)
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas, **eps)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, **eps)


class LRSchedule:
    """Learning rate as a pure function of the position ``(epoch, batch)`` (nothing to checkpoint).

    ``multistep`` changes per epoch (lr x gamma from each milestone epoch on, 0-based: milestone 45
    means epochs 0-44 at lr, 45 on at lr x gamma, the DACNN paper's "0.01 from epoch 45");
    ``cosine`` decays per iteration to ``min_lr`` (ConvMixer, SPEC.md 1.2); ``triangle`` rises
    linearly per iteration from ``lr_triangle[0]`` x lr to lr at the fraction ``lr_triangle[1]`` of
    training and falls to ``lr_triangle[2]`` x lr at its end (airbench's one-cycle); an optional
    linear warm-up per iteration precedes any of them. Each optimizer group gets ``lr`` x its
    ``lr_scale``.
    """

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.kind = cfg.lr_schedule
        self.base, self.min_lr, self.gamma = cfg.lr, cfg.min_lr, cfg.lr_gamma
        self.milestones = sorted(cfg.lr_milestones)
        self.steps_per_epoch = steps_per_epoch
        self.total = cfg.epochs * steps_per_epoch
        self.warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        self.triangle = tuple(cfg.lr_triangle)

    def __call__(self, epoch: int, batch: int) -> float:
        it = epoch * self.steps_per_epoch + batch
        if it < self.warmup:
            return self.base * (it + 1) / self.warmup
        if self.kind == "multistep":
            return self.base * self.gamma ** sum(epoch >= m for m in self.milestones)
        if self.kind == "cosine":
            progress = (it - self.warmup) / max(1, self.total - self.warmup)
            return self.min_lr + (self.base - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "triangle":
            start, peak_at, end = self.triangle
            steps = self.total - self.warmup
            peak = max(1, int(peak_at * steps))
            x = it - self.warmup
            factor = (start + (1.0 - start) * x / peak if x < peak
                      else 1.0 + (end - 1.0) * (x - peak) / max(1, steps - peak))
            return self.base * factor
        return self.base

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, batch: int) -> float:
        lr = self(epoch, batch)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr


def device_for_rank(device: torch.device, ctx: DistContext) -> torch.device:
    """Under torchrun each GPU process uses ``cuda:LOCAL_RANK``."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device
