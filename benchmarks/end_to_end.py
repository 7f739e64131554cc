"""Whole-process ``dacnn train`` runs, variants side by side: where the wall time of a short run goes.

Runs ``python -m dacnn train ARGS`` once per variant per round, the variants interleaved round by
round so they see the same machine load, and prints per variant the medians (and min-max) of: the
process wall time, the training seconds of the epochs (``epoch_train_s`` in ``metrics.jsonl``), the
share of the wall time spent training, training img/s, and the process's user and system CPU
seconds (``getrusage`` of the child). Ratios are to the first variant.

Default: the issue-14 scenario, one 5,000-image CIFAR-10 epoch of DACNN-14 at width 32 with the
``dacnn-cifar10`` recipe (5,000 validation and 10,000 test images evaluated too), variants
``default`` and ``no-malloc-tuning`` (``DACNN_TUNE_MALLOC=0``: glibc returns freed blocks to the OS).

    python benchmarks/end_to_end.py --rounds 3
    python benchmarks/end_to_end.py --variant "default=" --variant "nchw=--no-channels-last"
    python benchmarks/end_to_end.py --quick          # 1,000 images, 2 rounds (< 2 minutes)

A variant is ``NAME=FLAGS`` (extra ``dacnn train`` flags) with optional ``ENV=VALUE`` words first
(``--variant "mmap=DACNN_TUNE_MALLOC=0 --threads 1"``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCENARIO = ["--model", "dacnn14", "--recipe", "dacnn-cifar10", "--width", "32", "--epochs", "1",
            "--train-subset", "5000"]
DEFAULT_VARIANTS = ["default=", "no-malloc-tuning=DACNN_TUNE_MALLOC=0"]


def parse_variant(text: str) -> tuple[str, dict[str, str], list[str]]:
    name, _, rest = text.partition("=")
    env, flags = {}, []
    for word in shlex.split(rest):
        key, sep, value = word.partition("=")
        if sep and not flags and not word.startswith("-") and key.isupper():
            env[key] = value
        else:
            flags.append(word)
    return name, env, flags


def run_once(args: list[str], env: dict[str, str], out_dir: Path) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "dacnn", "train", *args, "--out-dir", str(out_dir), "--run-name", "r"]
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out_dir / "r" / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(r["epoch_train_s"] for r in records)
    images = sum(r["images_per_s"] * r["epoch_train_s"] for r in records)
    return {"wall": wall, "train": train_s, "share": train_s / wall, "img_s": images / train_s,
            "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", action="append", help="NAME=[ENV=V ...] [FLAGS] (repeatable)")
    parser.add_argument("--args", default=" ".join(SCENARIO), help="the dacnn train flags of every variant")
    parser.add_argument("--quick", action="store_true", help="1,000 training images, 2 rounds")
    opts = parser.parse_args()
    base = shlex.split(opts.args)
    rounds = opts.rounds
    if opts.quick:
        base = [*base, "--train-subset", "1000", "--val-size", "1000"]
        rounds = min(rounds, 2)
    variants = [parse_variant(v) for v in (opts.variant or DEFAULT_VARIANTS)]
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for i, (name, env, flags) in enumerate(variants):
                out = Path(tmp) / f"{r}-{i}"
                results[name].append(run_once([*base, *flags], env, out))
    print(f"`dacnn train {' '.join(base)}`, {rounds} rounds interleaved; medians (min-max)")
    print()
    print("| variant | wall s | train s | train share | train img/s | user s | sys s | wall vs first |")
    print("|---|---|---|---|---|---|---|---|")
    first = statistics.median(x["wall"] for x in results[variants[0][0]])

    def cell(xs: list[float], fmt: str) -> str:
        return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"

    for name, env, flags in variants:
        rs = results[name]
        wall = statistics.median(x["wall"] for x in rs)
        label = " ".join([*(f"{k}={v}" for k, v in env.items()), *flags]) or "(defaults)"
        print(f"| {name}: `{label}` | {cell([x['wall'] for x in rs], '.1f')} | "
              f"{cell([x['train'] for x in rs], '.1f')} | {cell([x['share'] for x in rs], '.2f')} | "
              f"{cell([x['img_s'] for x in rs], '.0f')} | {cell([x['user'] for x in rs], '.1f')} | "
              f"{cell([x['sys'] for x in rs], '.1f')} | {wall / first:.2f} |")


if __name__ == "__main__":
    main()
