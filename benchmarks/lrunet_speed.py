"""LruNet speed: the reference forward pass, re-implemented op for op, against dacnn's LruNet.

Both networks compute the same function (checked before timing: outputs in eval mode, and in train
mode with the same dropout seed, after copying our weights into the reference). In one run, with
the two interleaved and medians taken, it times

* a training step: SGD (lr 0.1, momentum 0.9, weight decay 5e-4, the LruNet recipe) on a batch of
  256 CIFAR-sized images, cross-entropy, forward + backward + update;
* inference: eval mode, ``torch.no_grad``, batch 256;

and prints images per second and the ratio ours / reference. Default: 14-LruNet-1x on 3x32x32.

    python benchmarks/lrunet_speed.py [--reuse 14] [--width 1] [--batch 256] [--reps 3]
                                      [--threads N] [--no-tune-malloc] [--compile] [--memory]
    python benchmarks/lrunet_speed.py --quick     # batch 64, 2 reps, with --memory (< 2 minutes)

glibc's allocator is tuned as in ``dacnn train`` (``dacnn.runtime.tune_malloc``: freed memory stays
in the heap, no page faults per step) for both networks; ``--no-tune-malloc`` leaves it.
``--compile`` times ``torch.compile`` of ours too. ``--memory`` states each network's peak resident
memory over two training steps, each measured in a forked child of the same process.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from dacnn.models.lrunet import LruNet
from dacnn.runtime import tune_malloc


# ---- the reference, op for op (okankop/CNN-layer-reuse models/lrunet.py, restated) ----------------
class ReferenceShuffle(nn.Module):
    """Swap the channel halves with ``cat``, then view (2, C/2), permute, contiguous, view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.size()
        x = torch.cat([x[:, c // 2:, :, :], x[:, : c // 2, :, :]], 1)
        x = x.view(b, 2, c // 2, h, w).permute(0, 2, 1, 3, 4).contiguous()
        return x.view(b, c, h, w)


class ReferenceBlock(nn.Module):
    """One dw (multiplier 2) and one pw (groups 8) ``nn.Conv2d`` called ``n`` times, BN lists."""

    def __init__(self, planes: int, n: int) -> None:
        super().__init__()
        self.n = n
        self.shuffle = ReferenceShuffle()
        self.relu = nn.ReLU(inplace=True)
        self.dw = nn.Conv2d(planes, planes * 2, 3, 1, 1, groups=planes, bias=False)
        self.pw = nn.Conv2d(planes * 2, planes, 1, 1, 0, groups=8, bias=False)
        self.dw_bn_list = nn.ModuleList(nn.BatchNorm2d(planes * 2) for _ in range(n))
        self.pw_bn_list = nn.ModuleList(nn.BatchNorm2d(planes) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i in range(self.n):
            res = x if i == 0 else out
            out = self.dw_bn_list[i](self.dw(x if i == 0 else out))
            out = self.pw_bn_list[i](self.pw(out))
            out += res
            out = self.relu(out)
            if i != self.n - 1:
                out = self.shuffle(out)
        return out


class ReferenceLruNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 1, n: int = 14, in_chans: int = 3) -> None:
        super().__init__()
        self.width, self.num_classes = width, num_classes
        cfg = [c * width for c in (64, 128, 256, 512, 256)]
        self.features = nn.Sequential(nn.Conv2d(in_chans, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True))
        self.stage1, self.stage2, self.stage3, self.stage4 = (ReferenceBlock(c, n) for c in cfg[:4])
        self.classifier = nn.Sequential(
            nn.Conv2d(cfg[3], cfg[4], 1, 1, 0, groups=8, bias=False), nn.BatchNorm2d(cfg[4]),
            nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Conv2d(cfg[4], num_classes, 1),
            nn.ReLU(inplace=True), nn.AvgPool2d(2, stride=1))
        self.mpool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        if self.width == 2:
            out = torch.cat([out, out], 1)
        out = self.mpool(self.stage1(out))
        out = torch.cat([out, out], 1)
        out = self.mpool(self.stage2(out))
        out = torch.cat([out, out], 1)
        out = self.stage3(out)
        out = torch.cat([out, out], 1)
        out = self.mpool(self.stage4(out))
        out = self.classifier(out)
        return out.view(out.size(0), self.num_classes)


def reference_from(ours: LruNet) -> ReferenceLruNet:
    """A reference network holding a copy of ``ours``'s weights (key renames only)."""
    ref = ReferenceLruNet(ours.num_classes, ours.width_mult, ours.layer_reuse, ours.stem[0].in_channels)
    renames = (("stem.", "features."), (".dw_bns.", ".dw_bn_list."), (".pw_bns.", ".pw_bn_list."),
               (".kernels.", "."), ("pre_logits.", "classifier."), ("fc.", "classifier.4."))
    state = {}
    for key, value in ours.state_dict().items():
        for a, b in renames:
            key = key.replace(a, b)
        state[key] = value.clone()
    ref.load_state_dict(state)
    return ref


# ---- measurement ----------------------------------------------------------------------------------
def peak_rss_mb(name: str, args: argparse.Namespace) -> tuple[float, float]:
    """(peak, before the first step) resident MB of a fresh process training ``name`` for two steps."""
    cmd = [sys.executable, __file__, "--memory-child", name, "--reuse", str(args.reuse), "--width",
           str(args.width), "--batch", str(args.batch)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.no_tune_malloc:
        cmd.append("--no-tune-malloc")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def memory_child(name: str, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    ours = LruNet(args.reuse, args.width)
    model = reference_from(ours) if name == "reference" else ours
    x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    step = make_step(model, x, y)
    with open("/proc/self/statm") as f:  # resident now (the maximum so far includes the imports)
        before = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    step()
    step()
    print(_high_water_mb(), before)


def _high_water_mb() -> float:
    """This process's peak resident memory: ``VmHWM`` of its own address space. (``ru_maxrss`` is no
    use here: Linux carries it over from the parent across fork and exec, so every child reported
    the benchmark process's own, larger peak.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_same_function(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> float:
    """Largest output difference, eval mode and train mode (same dropout seed)."""
    worst = 0.0
    for train in (False, True):
        ours.train(train)
        ref.train(train)
        with torch.no_grad():
            torch.manual_seed(0)
            a = ours(x)
            torch.manual_seed(0)
            b = ref(x)
        scale = b.abs().max().item() + 1e-6
        worst = max(worst, (a - b).abs().max().item() / scale)
    return worst


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN201
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def make_infer(model: nn.Module, x: torch.Tensor):  # noqa: ANN201
    def infer() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    return infer


def timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reuse", type=int, default=14)
    parser.add_argument("--width", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per network and task")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-tune-malloc", action="store_true", help="leave glibc's allocator as it is")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    parser.add_argument("--memory", action="store_true", help="peak training memory of each network")
    parser.add_argument("--quick", action="store_true", help="batch 64, 2 reps, --memory")
    parser.add_argument("--memory-child", choices=("reference", "ours"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.reps, args.memory = 64, 2, True
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = False if args.no_tune_malloc else tune_malloc()
    if args.memory_child:
        memory_child(args.memory_child, args)
        return
    torch.manual_seed(0)
    ours = LruNet(args.reuse, args.width)
    ref = reference_from(ours)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    diff = check_same_function(ours, ref, x[:16])
    print(f"{args.reuse}-LruNet-{args.width}x, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"malloc tuned: {tuned}; max relative output difference ours vs reference: {diff:.1e}")
    if diff > 1e-4:
        raise SystemExit("outputs differ: not the same function")

    tasks = {
        "train step": {"reference": make_step(ref, x, y), "ours": make_step(ours, x, y)},
        "inference": {"reference": make_infer(ref, x), "ours": make_infer(ours, x)},
    }
    if args.compile:
        compiled = torch.compile(ours)
        tasks["train step"]["ours+compile"] = make_step(compiled, x, y)
        tasks["inference"]["ours+compile"] = make_infer(compiled, x)
    for task, fns in tasks.items():
        times: dict[str, list[float]] = {name: [] for name in fns}
        for fn in fns.values():  # warm-up (oneDNN primitives, allocator, compilation)
            fn()
        for _ in range(args.reps):  # interleaved
            for name, fn in fns.items():
                times[name].append(timed(fn))
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name, t in medians.items():
            ratio = medians["reference"] / t
            print(f"{task:11s} {name:13s} {args.batch / t:8.1f} img/s  (median {t:.3f} s, "
                  f"{min(times[name]):.3f}-{max(times[name]):.3f} of {args.reps})  x{ratio:.2f} vs reference")
    if args.memory:
        for name in ("reference", "ours"):
            peak, before = peak_rss_mb(name, args)
            print(f"peak memory {name:13s} {peak:8.0f} MB resident, {peak - before:.0f} MB above the process "
                  "before its first step (a fresh process, two training steps)")


if __name__ == "__main__":
    main()
