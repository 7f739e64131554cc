"""Training throughput of the engine's step, as a fraction of the matrix-multiply rate, and where it goes.

For each model and mode, times ``StepRunner.step`` (forward, cross-entropy, backward, Adagrad step:
exactly what ``dacnn train`` runs) on random CIFAR-sized batches, interleaved step by step with an
fp32 2048x2048 matrix multiply at 1 and at 2 threads (on CUDA: a bf16 8192x8192 one), and prints
images/s, the achieved training FLOP/s and their ratios to those matmul rates (medians, with the
spread (max-min)/median; the machine is shared and noisy, so compare ratios from one run).

``--profile`` adds the shares of a step (torch.profiler over the timed steps): BatchNorm, conv
forward, conv backward, optimizer, the rest, and the system CPU time of the process (page faults
show up here; ``dacnn.runtime.tune_malloc`` is applied as in ``dacnn train``). ``--end-to-end``
runs ``dacnn train`` on a 5,000-image CIFAR-10 subset for the first model and prints its training
img/s beside the pure step (the gap is data, logging, checks; ``benchmarks/end_to_end.py`` gives
the whole-process split).

Training FLOPs = 3 x forward FLOPs (``dacnn.count_flops``, FlopCounterMode over the forward only:
it over-counts grouped-convolution backward passes, ``docs/reference/PERFORMANCE.md``).
Reference (PERFORMANCE.md, hand-written DACNN-14 width 128 step): 0.44 eager, 0.54 channels_last,
0.63 channels_last + torch.compile; goal 0.75.

    python benchmarks/train_throughput.py                     # dacnn14 w128, resnet18 w64 and w16, 3 modes
    python benchmarks/train_throughput.py --models dacnn14 --modes eager,cl --steps 4 --profile
    python benchmarks/train_throughput.py --quick             # dacnn14 w32, cl, 4 steps (< 2 min)
    python benchmarks/train_throughput.py --device cuda       # bf16 + channels_last + compile
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dacnn import count_flops, create_model
from dacnn.runtime import tune_malloc
from dacnn.train.engine import StepRunner

MODES = {
    "eager": {"channels_last": False, "compile": False, "bf16": False},
    "cl": {"channels_last": True, "compile": False, "bf16": False},
    "cl+compile": {"channels_last": True, "compile": True, "bf16": False},
    "cl+bf16": {"channels_last": True, "compile": False, "bf16": True},
    "cl+compile+bf16": {"channels_last": True, "compile": True, "bf16": True},
}
MODEL_KWARGS = {"dacnn14": {"width": 128}, "resnet18": {}}  # a name@W in --models sets the width W


def model_kwargs(name: str) -> tuple[str, dict[str, int]]:
    """``resnet18@16`` -> (``resnet18``, its kwargs at width 16: the cpu protocol's width)."""
    model, _, width = name.partition("@")
    kwargs = dict(MODEL_KWARGS.get(model, {}))
    if width:
        kwargs["width"] = int(width)
    return model, kwargs
SHARES = {  # profiler op name -> share bucket (self CPU time)
    "BatchNorm": ("batch_norm", "batchnorm"),
    "conv bwd": ("convolution_backward", "convolutionbackward"),
    "conv fwd": ("mkldnn_convolution", "_convolution", "cudnn_convolution", "conv2d"),
    "optimizer": ("_foreach", "optimizer.", "addcmul_", "addcdiv_"),
    "pool/activation": ("pool", "relu", "clamp", "threshold"),
}


class MatmulRate:
    """Seconds of one matrix multiply: fp32 2048^2 at a given thread count (CPU), bf16 8192^2 (CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.n = 8192 if device.type == "cuda" else 2048
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.a = torch.randn(self.n, self.n, device=device, dtype=dtype)
        self.b = torch.randn(self.n, self.n, device=device, dtype=dtype)

    @property
    def flops(self) -> float:
        return 2.0 * self.n**3

    def seconds(self, threads: int | None = None, reps: int = 3) -> float:
        before = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            sync(self.device)
            start = time.perf_counter()
            for _ in range(reps):
                torch.mm(self.a, self.b)
            sync(self.device)
            return (time.perf_counter() - start) / reps
        finally:
            torch.set_num_threads(before)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bucket(name: str) -> str:
    low = name.lower()
    for share, keys in SHARES.items():
        if any(k in low for k in keys):
            return share
    return "other"


def bench(name: str, mode: str, batch: int, steps: int, warmup: int, device: torch.device,
          profile: bool) -> dict[str, float]:
    opts = MODES[mode]
    torch.manual_seed(0)
    model_name, kwargs = model_kwargs(name)
    model = create_model(model_name, num_classes=100, **kwargs)
    fwd_flops = count_flops(model, (3, 32, 32), batch_size=batch)
    model = model.to(device)
    if opts["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.01)
    step_model = torch.compile(model) if opts["compile"] else model
    amp = "bf16" if opts["bf16"] else "none"
    runner = StepRunner(step_model, optimizer, device, amp=amp, channels_last=opts["channels_last"])
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    mm = MatmulRate(device)
    threads = [None] if device.type == "cuda" else [1, 2]

    def one_step() -> None:
        runner.step(x, y)
        sync(device)

    t0 = time.perf_counter()
    for _ in range(warmup):
        one_step()
    warm_s = time.perf_counter() - t0
    step_s: list[float] = []
    mm_s: dict[int | None, list[float]] = {t: [] for t in threads}
    shares: dict[str, float] = {}
    sys_s = 0.0
    for i in range(steps):  # interleave: both see the same machine load
        prof = None
        if profile and i == steps // 2:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            prof.__enter__()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        one_step()
        step_s.append(time.perf_counter() - t)
        sys_s += resource.getrusage(resource.RUSAGE_SELF).ru_stime - ru.ru_stime
        if prof is not None:
            prof.__exit__(None, None, None)
            for event in prof.key_averages():
                key = bucket(event.key)
                shares[key] = shares.get(key, 0.0) + event.self_cpu_time_total
        for t_ in threads:
            mm_s[t_].append(mm.seconds(t_))
    step = statistics.median(step_s)
    train_flops = 3 * fwd_flops / step
    out = {"img_s": batch / step, "gflops": train_flops / 1e9, "warmup_s": warm_s,
           "spread": (max(step_s) - min(step_s)) / step, "sys_share": sys_s / sum(step_s)}
    for t_, times in mm_s.items():
        rate = mm.flops / statistics.median(times)
        out[f"mm{t_ or ''}_gflops"] = rate / 1e9
        out[f"ratio{t_ or ''}"] = train_flops / rate
    if shares:
        total = sum(shares.values())
        out.update({f"share {k}": v / total for k, v in shares.items()})
    return out


def end_to_end_img_s(name: str) -> float:
    """Training img/s of a 1-epoch ``dacnn train`` run on 5,000 CIFAR-10 images (default flags)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from end_to_end import run_once  # a sibling script

    model_name, kwargs = model_kwargs(name)
    args = ["--model", model_name, "--dataset", "cifar10", "--epochs", "1", "--train-subset", "5000",
            "--val-size", "500", "--no-eval-test", "--optimizer", "adagrad", "--lr", "0.01"]
    if "width" in kwargs:
        args += ["--width", str(kwargs["width"])]
    with tempfile.TemporaryDirectory() as tmp:
        return run_once(args, {}, Path(tmp))["img_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="dacnn14,resnet18,resnet18@16",
                        help="comma list; name@W trains at width W (resnet18@16: the cpu protocol's width)")
    parser.add_argument("--modes", default=None, help=f"comma list of {', '.join(MODES)} "
                        "(default: eager,cl,cl+compile; on CUDA cl+compile+bf16)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", action="store_true", help="shares of BN, conv fwd/bwd, optimizer")
    parser.add_argument("--end-to-end", action="store_true", help="also time `dacnn train` (first model)")
    parser.add_argument("--quick", action="store_true", help="dacnn14 at width 32, channels_last, 4 steps")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.quick:
        MODEL_KWARGS["dacnn14"] = {"width": 32}
        args.models, args.modes, args.steps, args.warmup = "dacnn14", args.modes or "cl", 4, 1
        args.profile = True
    modes = args.modes or ("cl+compile+bf16" if device.type == "cuda" else "eager,cl,cl+compile")
    tuned = tune_malloc()
    rate_name = "bf16 matmul" if device.type == "cuda" else "matmul at 1 / 2 threads"
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"malloc tuned {tuned}; medians of {args.steps} steps (spread = (max-min)/median); "
          f"ratio = training FLOP/s / {rate_name} FLOP/s")
    print()
    cols = "| model | mode | img/s | GFLOP/s | matmul GFLOP/s | ratio | spread | sys | warm-up |"
    print(cols)
    print("|" + "---|" * (cols.count("|") - 1))
    first = None
    for name in args.models.split(","):
        for mode in modes.split(","):
            r = bench(name, mode, args.batch_size, args.steps, args.warmup, device, args.profile)
            first = first or (name, r)
            if device.type == "cuda":
                mm, ratio = f"{r['mm_gflops']:.0f}", f"{r['ratio']:.3f}"
            else:
                mm = f"{r['mm1_gflops']:.0f} / {r['mm2_gflops']:.0f}"
                ratio = f"{r['ratio1']:.2f} / {r['ratio2']:.2f}"
            print(f"| {name} | {mode} | {r['img_s']:.1f} | {r['gflops']:.1f} | {mm} | {ratio} | "
                  f"{r['spread']:.2f} | {r['sys_share']:.2f} | {r['warmup_s']:.1f} s |", flush=True)
            shares = {k[6:]: v for k, v in r.items() if k.startswith("share ")}
            if shares:
                print("|  | shares of one step | " + ", ".join(f"{k} {v:.0%}" for k, v in sorted(
                    shares.items(), key=lambda kv: -kv[1])) + " |  |  |  |  |  |  |")
    if args.end_to_end and first is not None and device.type == "cpu":
        name, r = first
        e2e = end_to_end_img_s(name)
        print()
        print(f"`dacnn train` of {name} (1 epoch, 5,000 CIFAR-10 images, default flags): {e2e:.0f} img/s "
              f"training, {e2e / r['img_s']:.2f} of the pure step's {r['img_s']:.0f} img/s above")


if __name__ == "__main__":
    main()
