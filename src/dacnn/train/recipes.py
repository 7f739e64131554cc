"""Named training recipes: the papers' protocols as presets of :class:`~dacnn.train.config.TrainConfig`.

Each recipe is a function whose docstring cites its source and whose return value is the settings
it fixes; everything else keeps the config defaults. Any setting can be overridden (``--epochs 9
--width 32 --train-subset 5000``) for scaled-down runs; a multistep schedule then scales its
milestones with the epochs (see :func:`~dacnn.train.config.resolve_config`).

Papers: DACNN = arXiv 1904.09764; SPEC =
``docs/reference/SPEC.md`` (read from the reference code of LruNet and kernel-sharing).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dacnn.errors import ConfigError

__all__ = ["Recipe", "RECIPES", "get_recipe", "list_recipes"]


@dataclass(frozen=True)
class Recipe:
    """A named preset: its settings and the docstring that cites where they come from."""

    name: str
    doc: str
    settings: dict[str, Any]

    @property
    def summary(self) -> str:
        return self.doc.splitlines()[0] if self.doc else ""


RECIPES: dict[str, Recipe] = {}


def _recipe(name: str) -> Callable[[Callable[[], dict[str, Any]]], Callable[[], dict[str, Any]]]:
    def register(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        RECIPES[name] = Recipe(name, inspect.getdoc(fn) or "", fn())
        return fn

    return register


_DACNN_OPTIM = {"optimizer": "adagrad", "lr": 0.1, "lr_schedule": "multistep", "lr_gamma": 0.1}


@_recipe("dacnn-cifar100")
def dacnn_cifar100() -> dict[str, Any]:
    """DACNN on CIFAR-100 (DACNN paper section 4.1, "Dataset and training settings").

    Adagrad, lr 0.1 and 0.01 from epoch 45 on, 90 epochs, random horizontal flip, per-channel
    mean/std normalisation. The paper gives no batch size or weight decay: 128 and none are ours.
    """
    return {**_DACNN_OPTIM, "dataset": "cifar100", "epochs": 90, "lr_milestones": [45],
            "batch_size": 128, "flip": True, "normalize": True}


@_recipe("dacnn-cifar10")
def dacnn_cifar10() -> dict[str, Any]:
    """DACNN on CIFAR-10 (DACNN paper section 4.2): as section 4.1 but without data augmentation.

    Adagrad, lr 0.1 and 0.01 at epoch 45, 90 epochs, no augmentation, mean/std normalisation
    (section 4.1's preprocessing; 4.2 does not restate it). Batch 128 is ours (not in the paper).
    """
    return {**_DACNN_OPTIM, "dataset": "cifar10", "epochs": 90, "lr_milestones": [45],
            "batch_size": 128, "flip": False, "normalize": True}


@_recipe("dacnn-svhn")
def dacnn_svhn() -> dict[str, Any]:
    """DACNN on SVHN (DACNN paper section 4.2): 60 epochs, lr 0.1 divided by 10 every 20 epochs.

    Adagrad, no data augmentation "following common practice", mean/std normalisation. Batch 128 is
    ours (not in the paper).
    """
    return {**_DACNN_OPTIM, "dataset": "svhn", "epochs": 60, "lr_milestones": [20, 40],
            "batch_size": 128, "flip": False, "normalize": True}


@_recipe("lrunet")
def lrunet() -> dict[str, Any]:
    """LruNet (SPEC.md section 2.2, the README schedule of okankop/CNN-layer-reuse).

    SGD lr 0.1, 0.01 from epoch 200, 0.001 from 250, 300 epochs, momentum 0.9, weight decay 5e-4 on
    every parameter, batch 256; augmentation random crop (padding 4) + rotation (+-10 degrees) +
    horizontal flip; **no normalisation** (the reference's Normalize line is commented out); dropout
    0.5 in the classifier. Fashion-MNIST is padded to 32x32 for train and test alike (the reference
    crops train images to 32 and leaves test images at 28; the net is fully convolutional).
    """
    return {"model": "lrunet_1x", "dataset": "cifar10", "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
            "weight_decay": 5e-4, "lr_schedule": "multistep", "lr_milestones": [200, 250],
            "lr_gamma": 0.1, "epochs": 300, "batch_size": 256, "crop_padding": 4,
            "rotate_degrees": 10.0, "flip": True, "normalize": False, "model_kwargs": {"drop_rate": 0.5}}


@_recipe("ks-seresnet")
def ks_seresnet() -> dict[str, Any]:
    """Kernel-sharing SE-ResNet (SPEC.md section 1.4, seresnet_cifar*_run.sh of kernel-sharing).

    SGD lr 0.1, momentum 0.9, weight decay 1e-4 on every parameter, lr x0.1 at epochs 85, 130 and 180,
    256 epochs, batch 128; random crop (padding 4) + horizontal flip. Normalisation uses our dataset
    mean/std, not the reference's (0.2023, 0.1994, 0.2010) std constants.
    """
    return {"model": "se_resnet_d_2_shared", "dataset": "cifar10", "optimizer": "sgd", "lr": 0.1,
            "momentum": 0.9, "weight_decay": 1e-4, "lr_schedule": "multistep",
            "lr_milestones": [85, 130, 180], "lr_gamma": 0.1, "epochs": 256, "batch_size": 128,
            "crop_padding": 4, "flip": True, "normalize": True}


@_recipe("ks-convmixer")
def ks_convmixer() -> dict[str, Any]:
    """Kernel-sharing ConvMixer-256/16 (SPEC.md section 1.2, convmixer_cifar*_run.sh).

    AdamW lr 0.01, eps 1e-3, betas (0.9, 0.999), weight decay 0.01 on tensors with more than one
    dimension only, cosine per iteration to 1e-6 without warm-up, 200 epochs, batch 128, gradient
    norm clipped at 1.0, fp16 mixed precision on GPU (the reference's AMP; plain fp32 on CPU).
    Augmentation as timm 0.5.4's ``create_transform`` and ``Mixup`` build it there: random crop
    (padding 4) + horizontal flip, RandAugment rand-m9-mstd0.5-inc1, normalisation, RandomErasing
    (p 0.25, pixel mode, one box); mixup (alpha 0.5) and CutMix (alpha 0.5), one of the two per batch,
    with label smoothing 0.1 folded into the soft targets and the soft-target cross-entropy
    (:mod:`dacnn.data.batch_augment`; RandAugment needs the ``aug`` extra, kornia). Normalisation
    and RandAugment's fill use our dataset mean/std rather than ImageNet's.
    """
    return {"model": "convmixer_256_16_shared", "dataset": "cifar10", "optimizer": "adamw", "lr": 0.01,
            "eps": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.01, "decay_norm_and_bias": False,
            "lr_schedule": "cosine", "min_lr": 1e-6, "warmup_epochs": 0.0, "epochs": 200,
            "batch_size": 128, "clip_grad": 1.0, "label_smoothing": 0.1, "amp": "fp16",
            "crop_padding": 4, "flip": True, "rand_augment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25,
            "mixup": 0.5, "cutmix": 0.5, "normalize": True}


@_recipe("fast-cifar10")
def fast_cifar10() -> dict[str, Any]:
    """airbench94's recipe (Jordan, arXiv 2404.00498; ``airbench/lib_airbench94.py``), for any model.

    10 epochs at batch 1024; Nesterov SGD, momentum 0.85, in airbench's decoupled form: its lr of 11.5
    per 1,024 images divided by ``1024 (1 + 1/(1 - 0.85))`` for its summed loss is 1.5 on our mean
    loss, and its weight decay of 0.0153 per 1,024 images is 0.0153 / 7.67 = 0.0019957 removed per step
    (``decoupled_weight_decay``) from every weight, BatchNorm shifts included, whose learning rate
    is 64x (``norm_bias_lr_scale``); BatchNorm scales fixed at 1 and running statistics of momentum
    0.4 (airbench's 0.6 in its convention); label smoothing 0.2; a triangular
    schedule from 0.2x up to 1x at 23 % of the steps and down to 0.07x; alternating flips and
    2-pixel reflect-padded translations; the first conv set from the patch covariance of 5,000
    training images and frozen (its bias trains for 3 epochs); lookahead averaging; test-time
    augmentation level 2 (six views) on the test set. 5,000 images are held out for
    selection. airbench trains in fp16 on a GPU; here fp32 unless ``--amp`` says otherwise.
    """
    return {"model": "airbench94", "dataset": "cifar10", "epochs": 10, "batch_size": 1024,
            "eval_batch_size": 1000, "val_size": 5000, "optimizer": "sgd", "lr": 1.5, "momentum": 0.85,
            "nesterov": True, "weight_decay": 0.0153 / (1 + 1 / (1 - 0.85)), "decoupled_weight_decay": True,
            "norm_bias_lr_scale": 64.0, "freeze_norm_scale": True, "bn_momentum": 0.4, "label_smoothing": 0.2,
            "lr_schedule": "triangle", "lr_triangle": [0.2, 0.23, 0.07], "flip": True, "alternate_flip": True,
            "translate": 2, "whiten": True, "whiten_bias_epochs": 3, "lookahead": True, "tta": 2,
            "normalize": True, "channels_last": True}


@_recipe("demo")
def demo() -> dict[str, Any]:
    """The README's demo: DACNN-14 (paper section 3, one shared kernel) at width 32 on Fashion-MNIST.

    Sized for a 2-core CPU: 15,000 training images (1,000 more held out for validation), 4 epochs,
    images padded 28 -> 32 for the five pooling stages, channels_last. Measured on a 2-core AMD EPYC
    Zen 4: 87.78 % test accuracy in about 1.5 minutes (86.78 % with AVX2 kernels: the instruction set
    changes the rounding). Not the
    paper's optimiser: Adagrad (section 4.1) needs more epochs than a demo has (3 epochs on 12,000
    images: 78 % with Adagrad lr 0.1, 86 % with this SGD + Nesterov + cosine schedule).
    One torch thread: on the shared 2-core development machine two threads ran this model 5-10x
    slower than one (OpenMP threads spin-waiting for a busy core); pass ``--threads 2`` on an idle one.
    """
    return {"model": "dacnn14", "dataset": "fashion_mnist", "width": 32, "epochs": 4, "batch_size": 128,
            "train_subset": 15000, "val_size": 1000, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
            "nesterov": True, "lr_schedule": "cosine", "channels_last": True, "flip": False,
            "normalize": True, "threads": 1}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name raises :class:`ConfigError` with close matches."""
    if name not in RECIPES:
        close = difflib.get_close_matches(name, RECIPES, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown recipe {name!r}{hint} (known: {', '.join(RECIPES)})")
    return RECIPES[name]


def list_recipes() -> list[Recipe]:
    return list(RECIPES.values())
