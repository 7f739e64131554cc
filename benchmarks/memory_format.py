"""channels_last against contiguous (NCHW) training steps, per model family, interleaved in one run.

For one model of each family, times ``StepRunner.step`` (what ``dacnn train`` runs: forward,
cross-entropy, backward, optimizer step) on a random CIFAR-sized batch in both memory formats,
alternating the two step by step, and prints the medians (min-max) and the ratio NCHW / NHWC
(> 1: channels_last is faster). ``dacnn.train.speed.CPU_CHANNELS_LAST`` holds the defaults these
figures chose; glibc's allocator is tuned first as in ``dacnn train`` (``dacnn.runtime``).

    python benchmarks/memory_format.py                  # every family, batch 64, 5 steps each
    python benchmarks/memory_format.py --models dacnn14:width=128,resnet18 --steps 8
    python benchmarks/memory_format.py --quick          # 3 models, batch 32, 3 steps (< 2 minutes)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dacnn import create_model, model_info
from dacnn.runtime import tune_malloc
from dacnn.train.engine import StepRunner

DEFAULT_MODELS = ("dacnn14:width=32,dacnn14:width=128,resnet18,se_resnet_d_2_shared,vgg16_1fc,"
                  "sharesnet164_shared,convmixer_256_16_shared,lrunet_1x:layer_reuse=14")

QUICK_MODELS = "dacnn14:width=32,resnet18,lrunet_1x:layer_reuse=2"


def parse_model(text: str) -> tuple[str, dict[str, int]]:
    name, _, rest = text.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        kwargs[key] = int(value)
    return name, kwargs


def runner_for(name: str, kwargs: dict[str, int], channels_last: bool) -> StepRunner:
    torch.manual_seed(0)
    info = model_info(name)
    model = create_model(name, num_classes=10, **kwargs)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    assert info.input_size[1] == 32, name
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return StepRunner(model, optimizer, torch.device("cpu"), channels_last=channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None,
                        help="comma list of NAME[:KEY=INT;KEY=INT] (default: one or two per family; "
                        "--quick: dacnn14 w32, resnet18, lrunet_1x with 2 reuses)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="batch 32, 3 steps")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.steps = 32, 3
    args.models = args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = tune_malloc()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"malloc tuned {tuned}; medians (min-max) of {args.steps} interleaved steps after one warm-up")
    print()
    print("| model | family | NCHW ms/step | channels_last ms/step | NCHW / channels_last |")
    print("|---|---|---|---|---|")
    for text in args.models.split(","):
        name, kwargs = parse_model(text)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch_size, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (args.batch_size,), generator=gen)
        runners = {fmt: runner_for(name, kwargs, fmt) for fmt in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        for runner in runners.values():
            runner.step(x, y)
        for _ in range(args.steps):
            for fmt, runner in runners.items():
                start = time.perf_counter()
                runner.step(x, y)
                times[fmt].append(time.perf_counter() - start)
        med = {fmt: statistics.median(t) for fmt, t in times.items()}

        def cell(ts: list[float]) -> str:
            return f"{1e3 * statistics.median(ts):.0f} ({1e3 * min(ts):.0f}-{1e3 * max(ts):.0f})"

        print(f"| {text} | {model_info(name).family} | {cell(times[False])} | {cell(times[True])} | "
              f"{med[False] / med[True]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
