"""Loader throughput: images/s of DeviceLoader for crop+flip+normalise at batch 256 on this CPU.

Also with LruNet's rotation, and a naive per-image Python loop (pad, crop, flip, normalise one image
at a time, then stack: what a torchvision-style Dataset + transforms does) measured in the same run.
Data: CIFAR-10 train from $DACNN_DATA or ../shared/data when present, else 50,000 random images.

    .venv/bin/python benchmarks/data_loader.py [--epochs 3] [--batch-size 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from dacnn.data import DATASETS, Augment, DeviceLoader, load_dataset
from dacnn.data.synthetic import random_split
from dacnn.runtime import tune_malloc


def load_train() -> tuple[object, str]:
    root = os.environ.get("DACNN_DATA") or str(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    if (Path(root) / "cifar10").is_dir():
        return load_dataset("cifar10", "train", root), f"cifar10 train from {root}"
    return random_split("cifar10", "train", 50000, (32, 32, 3), 10), "50,000 random 32x32x3 images"


def loader_rate(loader: DeviceLoader, epochs: int) -> tuple[float, float]:
    """Best images/s over ``epochs`` full passes (after a warm-up pass): by wall clock and per CPU second.

    The CPU-second rate (process time, all threads) is what the loader costs; it is the figure to
    read when other processes load the machine and wall-clock time includes waiting for a core.
    """
    for _ in loader:
        pass
    best_wall = best_cpu = 0.0
    for _ in range(epochs):
        start, cpu_start = time.perf_counter(), time.process_time()
        seen = 0
        for x, _y in loader:
            seen += x.shape[0]
        if loader.device.type == "cuda":
            torch.cuda.synchronize()
        best_wall = max(best_wall, seen / (time.perf_counter() - start))
        best_cpu = max(best_cpu, seen / max(time.process_time() - cpu_start, 1e-9))
    return best_wall, best_cpu


def naive_rate(images: np.ndarray, batch_size: int, batches: int, seed: int = 0) -> tuple[float, float]:
    """Per-image Python loop: pad, random crop, random flip, normalise, then stack into a batch."""
    mean = np.asarray(DATASETS["cifar10"].mean, dtype=np.float32)
    std = np.asarray(DATASETS["cifar10"].std, dtype=np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    start, cpu_start = time.perf_counter(), time.process_time()
    for b in range(batches):
        out = []
        for i in order[b * batch_size: (b + 1) * batch_size]:
            img = np.pad(images[i], ((4, 4), (4, 4), (0, 0)))
            dy, dx = rng.integers(0, 9, size=2)
            img = img[dy: dy + 32, dx: dx + 32]
            if rng.random() < 0.5:
                img = img[:, ::-1]
            img = (img.astype(np.float32) / 255.0 - mean) / std
            out.append(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))))
        torch.stack(out)
    seen = batches * batch_size
    return seen / (time.perf_counter() - start), seen / max(time.process_time() - cpu_start, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--naive-batches", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    tune_malloc()  # as dacnn train does (dacnn.runtime)
    if args.threads:
        torch.set_num_threads(args.threads)
    split, what = load_train()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    threads = torch.get_num_threads()
    print(f"data: {what}; device {args.device}; torch {torch.__version__}, {threads} threads; "
          f"{os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"{'':42s} {'images/s (wall)':>16s} {'per CPU-second':>16s}")
    common = dict(batch_size=args.batch_size, shuffle=True, drop_last=True, device=args.device)
    rows = [
        ("crop4 + flip + normalise, torch's threads",
         DeviceLoader(split, augment=Augment(4, True), cpu_threads=None, **common)),
        ("index + normalise (no augmentation)", DeviceLoader(split, **common)),
        ("crop4 + flip + normalise", DeviceLoader(split, augment=Augment(4, True), **common)),
        ("crop4 + flip + rotate10 (LruNet, /255)",
         DeviceLoader(split, augment=Augment.lrunet(), normalize=False, **common)),
        ("crop4 + flip + cutout8 + normalise",
         DeviceLoader(split, augment=Augment(4, True, 0.0, 8), **common)),
    ]
    rates = {}
    for label, loader in rows:
        rates[label] = loader_rate(loader, args.epochs)
        print(f"{label:42s} {rates[label][0]:>16,.0f} {rates[label][1]:>16,.0f}", flush=True)
    naive = naive_rate(split.images, args.batch_size, args.naive_batches)
    print(f"{'naive per-image loop (crop+flip+normalise)':42s} {naive[0]:>16,.0f} {naive[1]:>16,.0f}")
    fast = rates["crop4 + flip + normalise"]
    print(f"speed-up of the batched loader over the loop: {fast[0] / naive[0]:.1f}x (wall), "
          f"{fast[1] / naive[1]:.1f}x (CPU time)")


if __name__ == "__main__":
    main()
