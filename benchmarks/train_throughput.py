"""Training throughput of the engine's step on this CPU, as a fraction of an fp32 matrix multiply.

For each model and mode, times ``StepRunner.step`` (forward, cross-entropy, backward, Adagrad step:
exactly what ``dacnn train`` runs) on random CIFAR-sized batches, interleaved with an fp32
2048x2048 matrix multiply, and prints images/s, the achieved training FLOP/s and their ratio to
the matmul's FLOP/s (medians; the machine is shared and noisy, so compare ratios from one run).

Training FLOPs = 3 x forward FLOPs (``dacnn.count_flops``, FlopCounterMode over the forward only:
it over-counts grouped-convolution backward passes, ``../shared/reference/PERFORMANCE.md``).

Reference (PERFORMANCE.md, hand-written DACNN-14 width 128 step): 0.44 eager, 0.54 channels_last,
0.63 channels_last + torch.compile; goal 0.8.

    python benchmarks/train_throughput.py                     # dacnn14 (w128) and resnet18, 3 modes
    python benchmarks/train_throughput.py --models dacnn14 --modes eager,cl --steps 4
    python benchmarks/train_throughput.py --modes cl,cl+bf16  # bf16 autocast (AMX) for comparison
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dacnn import count_flops, create_model
from dacnn.train.engine import StepRunner

MODES = {
    "eager": {"channels_last": False, "compile": False, "bf16": False},
    "cl": {"channels_last": True, "compile": False, "bf16": False},
    "cl+compile": {"channels_last": True, "compile": True, "bf16": False},
    "cl+bf16": {"channels_last": True, "compile": False, "bf16": True},
    "cl+compile+bf16": {"channels_last": True, "compile": True, "bf16": True},
}
MODEL_KWARGS = {"dacnn14": {"width": 128}, "resnet18": {}}


def matmul_seconds(a: torch.Tensor, b: torch.Tensor, reps: int = 3) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return (time.perf_counter() - start) / reps


def bench(name: str, mode: str, batch: int, steps: int, warmup: int) -> dict[str, float]:
    opts = MODES[mode]
    torch.manual_seed(0)
    model = create_model(name, num_classes=100, **MODEL_KWARGS.get(name, {}))
    fwd_flops = count_flops(model, (3, 32, 32), batch_size=batch)
    if opts["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.01)
    step_model = torch.compile(model) if opts["compile"] else model
    runner = StepRunner(step_model, optimizer, torch.device("cpu"), channels_last=opts["channels_last"])
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)

    def one_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=opts["bf16"]):
            runner.step(x, y)

    t0 = time.perf_counter()
    for _ in range(warmup):
        one_step()
    warm_s = time.perf_counter() - t0
    step_s, mm_s = [], []
    for _ in range(steps):  # interleave: both see the same machine load
        t = time.perf_counter()
        one_step()
        step_s.append(time.perf_counter() - t)
        mm_s.append(matmul_seconds(a, b))
    step, mm = statistics.median(step_s), statistics.median(mm_s)
    train_flops = 3 * fwd_flops
    return {"img_s": batch / step, "gflops": train_flops / step / 1e9, "mm_gflops": 2 * n**3 / mm / 1e9,
            "ratio": (train_flops / step) / (2 * n**3 / mm), "warmup_s": warm_s,
            "spread": (max(step_s) - min(step_s)) / step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="dacnn14,resnet18")
    parser.add_argument("--modes", default="eager,cl,cl+compile", help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"medians of {args.steps} steps (spread = (max-min)/median)")
    print(f"{'model':10s} {'mode':16s} {'img/s':>7s} {'GFLOP/s':>8s} {'matmul':>8s} {'ratio':>6s} "
          f"{'spread':>7s} {'warm-up':>8s}")
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            r = bench(name, mode, args.batch_size, args.steps, args.warmup)
            print(f"{name:10s} {mode:16s} {r['img_s']:7.1f} {r['gflops']:8.1f} {r['mm_gflops']:8.1f} "
                  f"{r['ratio']:6.2f} {r['spread']:7.2f} {r['warmup_s']:7.1f}s", flush=True)


if __name__ == "__main__":
    main()
