"""Batch augmentation throughput: kornia's augmentations against DeviceLoader's, images/s at batch 128.

The kernel-sharing ConvMixer recipe (SPEC.md 1.2) needs RandAugment rand-m9-mstd0.5-inc1, mixup and
CutMix (alpha 0.5) and RandomErasing (p 0.25). Measured in one run on one thread, on CIFAR-sized uint8
batches: DeviceLoader's crop + flip + normalise (the baseline); kornia's ``AugmentationSequential``
doing the same; kornia's ``RandAugment``, ``RandomErasing``, ``RandomMixUpV2`` and ``RandomCutMixV2``
as they come; dacnn's timm-faithful versions (:mod:`dacnn.data.batch_augment`: timm's draws, kornia's
pixel operations); the whole ``ks-convmixer`` training augmentation in the loader; and, for scale,
the training step of the model it feeds. Ratios are to the baseline's rate per CPU second (the
figure to read on a loaded machine; wall-clock rates are printed beside it).
Data: CIFAR-10 train from $DACNN_DATA or ../shared/data when present, else random images.

    .venv/bin/python benchmarks/batch_augment.py [--quick] [--batches 30] [--threads 1] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dacnn.data import Augment, DeviceLoader, load_dataset
from dacnn.data.batch_augment import (
    MixSpec,
    RandAugment,
    RandAugmentSpec,
    mix_batch,
    random_erasing,
    sample_erasing,
)
from dacnn.data.loader import split_mean_std
from dacnn.data.synthetic import random_split

BATCH = 128


def load_train(limit: int) -> tuple[object, str]:
    root = os.environ.get("DACNN_DATA") or str(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    if (Path(root) / "cifar10").is_dir():
        return load_dataset("cifar10", "train", root).subset(limit, seed=0), f"cifar10 train from {root}"
    return random_split("cifar10", "train", limit, (32, 32, 3), 10), f"{limit:,} random 32x32x3 images"


def rate(fn: Callable[[int], object], batches: int, repeats: int,
         device: torch.device) -> tuple[float, float]:
    """Best images/s over ``repeats`` runs of ``batches`` calls ``fn(b)`` (after one warm-up call):
    by wall clock and per CPU second."""
    fn(0)
    best_wall = best_cpu = 0.0
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        for b in range(batches):
            fn(b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seen = batches * BATCH
        best_wall = max(best_wall, seen / (time.perf_counter() - start))
        best_cpu = max(best_cpu, seen / max(time.process_time() - cpu, 1e-9))
    return best_wall, best_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=30, help="batches per timed pass (default 30)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--step-model", default="convmixer_256_16_shared",
                        help="model whose training step is timed for scale ('' to skip)")
    parser.add_argument("--quick", action="store_true", help="10 batches, 2 repeats, no training step")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.repeats, args.step_model = 10, 2, ""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import kornia
    import kornia.augmentation as K
    from kornia.augmentation.auto import RandAugment as KorniaRandAugment

    split, source = load_train(args.batches * BATCH)
    mean, std = split_mean_std(split)
    print(f"data: {source}; batch {BATCH}; {args.batches} batches x best of {args.repeats}; "
          f"{torch.get_num_threads()} thread(s), {device}; torch {torch.__version__}, "
          f"kornia {kornia.__version__}\n")

    base = DeviceLoader(split, batch_size=BATCH, shuffle=True, drop_last=True, device=device,
                        augment=Augment(crop_padding=4, flip=True))
    recipe = DeviceLoader(split, batch_size=BATCH, shuffle=True, drop_last=True, device=device, mix=MixSpec(
        mixup=0.5, cutmix=0.5, num_classes=10, label_smoothing=0.1), augment=Augment(
        crop_padding=4, flip=True, rand_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25))
    images = torch.from_numpy(split.images).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.from_numpy(split.labels).to(device)

    def batch01(b: int) -> torch.Tensor:  # what kornia takes: float in [0, 1]
        return images[b * BATCH: (b + 1) * BATCH].float().div_(255.0)

    m, sd = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))
    normalised = [(batch01(b) - m) / sd for b in range(args.batches)]
    ready = [batch01(b) for b in range(args.batches)]
    kornia_crop_flip = K.AugmentationSequential(K.RandomCrop((32, 32), padding=4), K.RandomHorizontalFlip(),
                                                K.Normalize(torch.tensor(mean), torch.tensor(std))).to(device)
    kornia_ra = KorniaRandAugment(n=2, m=27)  # m of 30: timm's 9 of 10
    ours_ra = RandAugment(RandAugmentSpec.parse("rand-m9-mstd0.5-inc1"), mean)
    kornia_erase = K.RandomErasing(p=0.25)
    kornia_mixup = K.RandomMixUpV2(data_keys=["input", "class"])
    kornia_cutmix = K.RandomCutMixV2(beta=0.5, data_keys=["input", "class"], use_correct_lambda=True)
    mix = MixSpec(mixup=0.5, cutmix=0.5, num_classes=10, label_smoothing=0.1)
    rng = np.random.default_rng(0)
    gen = torch.Generator(device=device).manual_seed(0)

    def loader_pass(loader: DeviceLoader) -> Callable[[int], object]:
        state: dict[str, object] = {}

        def step(b: int) -> object:
            if b == 0 or "it" not in state:
                state["it"] = iter(loader)
            return next(state["it"])  # type: ignore[call-overload]
        return step

    cases: list[tuple[str, Callable[[int], object]]] = [
        ("DeviceLoader: crop 4 + flip + normalise (baseline)", loader_pass(base)),
        ("kornia AugmentationSequential: crop 4 + flip + normalise", lambda b: kornia_crop_flip(batch01(b))),
        ("kornia RandAugment(n=2, m=27): one op pair per batch", lambda b: kornia_ra(ready[b])),
        ("dacnn RandAugment rand-m9-mstd0.5-inc1 (kornia ops)",
         lambda b: ours_ra(ready[b], ours_ra.sample(BATCH, gen))),
        ("kornia RandomErasing(p=0.25), constant fill", lambda b: kornia_erase(normalised[b])),
        ("dacnn RandomErasing(p=0.25), noise fill",
         lambda b: random_erasing(normalised[b], sample_erasing(0.25, tuple(normalised[b].shape), gen))),
        ("kornia RandomMixUpV2 (lambda ~ U(0, 1))",
         lambda b: kornia_mixup(normalised[b], labels[b * BATCH: (b + 1) * BATCH])),
        ("kornia RandomCutMixV2(beta=0.5)",
         lambda b: kornia_cutmix(normalised[b], labels[b * BATCH: (b + 1) * BATCH])),
        ("dacnn mix_batch (mixup/CutMix 0.5, soft targets)",
         lambda b: mix_batch(normalised[b], labels[b * BATCH: (b + 1) * BATCH], mix, rng)),
        ("DeviceLoader: the whole ks-convmixer augmentation", loader_pass(recipe)),
    ]
    rows = [(name, *rate(fn, args.batches, args.repeats, device)) for name, fn in cases]
    if args.step_model:
        import dacnn
        from dacnn.train.engine import StepRunner
        model = dacnn.create_model(args.step_model, num_classes=10).to(device)
        runner = StepRunner(model, torch.optim.AdamW(model.parameters(), lr=1e-3), device)
        small = 16 if device.type == "cpu" else BATCH  # slow on one CPU thread
        x, y = normalised[0][:small], labels[:small]
        runner.step(x, y)
        start, cpu = time.perf_counter(), time.process_time()
        runner.step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rows.append((f"training step of {args.step_model} (batch {small}, for scale)",
                     small / (time.perf_counter() - start), small / max(time.process_time() - cpu, 1e-9)))
    baseline = rows[0][2]
    print("| what | images/s | images/s per CPU s | vs baseline (CPU s) |")
    print("|---|---:|---:|---:|")
    for name, wall, cpu_rate in rows:
        print(f"| {name} | {wall:,.0f} | {cpu_rate:,.0f} | {cpu_rate / baseline:.3g}x |")


if __name__ == "__main__":
    main()
