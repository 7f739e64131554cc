"""What sharing buys at inference: latency, throughput, peak memory and checkpoint size on this CPU.

For each DACNN / LruNet model and its free twin (``shared=False``; for LruNet the same network with
every use of a kernel given its own copy, :func:`dacnn.untie`) in one run:

* latency at batch 1 and throughput at batch 64: eval mode, ``torch.inference_mode``, float32,
  random input; the shared model and its twin are timed in alternation (round robin) after warm-up
  and the medians are reported, so machine noise hits both alike;
* peak memory: each model is built in a fresh subprocess whose glibc maps every allocation of 64 KiB
  or more on its own and unmaps it when freed (``MALLOC_MMAP_THRESHOLD_=65536``: otherwise the heap
  keeps the warm-up's freed blocks resident and the measured forward allocates nothing new, which
  read as 0.0 MB); Linux's peak-RSS counter (``VmHWM``) is reset through ``/proc/self/clear_refs``
  after the model is built and one warm-up pass ran, then one batch-64 forward runs and the new peak
  minus the RSS before it is reported (activations and workspace; torch allocations are invisible to
  tracemalloc). Weights are reported separately;
* checkpoint size: bytes of the compact fp32 export (:func:`dacnn.export.export_safetensors`).

    .venv/bin/python benchmarks/inference.py --threads 1    # all models, ~5 minutes
    .venv/bin/python benchmarks/inference.py --models dacnn14 --reps 3
    .venv/bin/python benchmarks/inference.py --sizes        # export sizes of every shared model only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import dacnn
from dacnn.export import export_safetensors
from dacnn.runtime import tune_malloc

# (label, registered name, kwargs of the shared model, module attributes to set); the twin is
# `shared=False` or `dacnn.untie`. LruNet's default eval path folds each use's BatchNorm into a
# per-use copy of the kernel; `fast=False` runs the reference ops, applying the kernel itself.
MODELS = [
    ("DACNN-14", "dacnn14", {}, {}),
    ("DACNN-18", "dacnn18", {}, {}),
    ("DACNN-34", "dacnn34", {}, {}),
    ("DACNN-18 REG", "dacnn18_reg", {}, {}),
    ("DACNN-14 MIX", "dacnn14_mix", {}, {}),
    ("DACNN-18 MIX", "dacnn18_mix", {}, {}),
    ("14-LruNet-1x", "lrunet_1x", {"layer_reuse": 14}, {}),
    ("14-LruNet-1x, reference ops", "lrunet_1x", {"layer_reuse": 14}, {"fast": False}),
    ("4-LruNet-1x", "lrunet_1x", {"layer_reuse": 4}, {}),
]
INPUT = (3, 32, 32)


def build(name: str, kwargs: dict, variant: str, attrs: dict) -> nn.Module:
    torch.manual_seed(0)
    if variant == "shared":
        model = dacnn.create_model(name, **kwargs)
    elif name.startswith("dacnn"):
        model = dacnn.create_model(name, shared=False, **kwargs)
    else:
        model = dacnn.create_model(name, **kwargs)
        dacnn.untie(model)  # every use gets its own copy of the kernel; same function
    for module in model.modules():
        for attr, value in attrs.items():
            if hasattr(module, attr):
                setattr(module, attr, value)
    return model.eval()


def check_twin(shared: nn.Module, free: nn.Module, label: str) -> None:
    """The twin must count every use as its own tensor and, for an untied copy, compute the same."""
    counts, twin = dacnn.count_params(shared), dacnn.count_params(free)
    if twin.unique != counts.per_use or twin.shared:
        raise RuntimeError(
            f"{label}: twin has {twin.unique:,} params, want {counts.per_use:,} and none shared"
        )
    if not shared.info.name.startswith("dacnn"):  # untied copy: same weights, same function
        x = torch.randn(2, *INPUT)
        with torch.inference_mode():
            torch.testing.assert_close(free(x), shared(x), rtol=1e-4, atol=1e-4)


def time_call(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def measure_speed(models: dict[str, nn.Module], reps1: int, reps64: int) -> dict[str, dict[str, float]]:
    """Median batch-1 latency (ms) and batch-64 throughput (img/s), variants alternating."""
    x1, x64 = torch.randn(1, *INPUT), torch.randn(64, *INPUT)
    times: dict[str, dict[str, list[float]]] = {k: {"b1": [], "b64": []} for k in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up (oneDNN primitive creation, allocator)
            for _ in range(3):
                m(x1)
            m(x64)
        for _ in range(reps1):
            for k, m in models.items():
                times[k]["b1"].append(time_call(m, x1))
        for _ in range(reps64):
            for k, m in models.items():
                times[k]["b64"].append(time_call(m, x64))
    return {
        k: {
            "latency_ms": 1e3 * statistics.median(t["b1"]),
            "latency_min_ms": 1e3 * min(t["b1"]),
            "throughput": 64 / statistics.median(t["b64"]),
            "throughput_max": 64 / min(t["b64"]),
        }
        for k, t in times.items()
    }


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(name: str, kwargs: dict, variant: str, attrs: dict) -> None:
    """(subprocess) peak RSS growth of one batch-64 forward, printed as JSON."""
    model = build(name, kwargs, variant, attrs)
    x = torch.randn(64, *INPUT)
    with torch.inference_mode():
        model(x)  # warm-up: one-time allocations are not activation memory
        before = _rss_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
        model(x)
        peak = _rss_kb("VmHWM")
    print(json.dumps({"peak_delta_mb": (peak - before) / 1024}))


def measure_memory(name: str, kwargs: dict, variant: str, attrs: dict) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", json.dumps([name, kwargs, variant, attrs])],
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "DACNN_TUNE_MALLOC": "0"},
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_delta_mb"]


def checkpoint_bytes(model: nn.Module, directory: str) -> int:
    """Bytes of the compact fp32 export (no model name recorded: an untied twin has none to rebuild)."""
    path = Path(directory) / "m.safetensors"
    return export_safetensors(model, path, "fp32", model_name="", model_kwargs={}).file_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated registered names (default: all listed)")
    parser.add_argument("--reps", type=int, default=5, help="batch-64 repetitions per model (batch 1: 6x)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--sizes", action="store_true", help="only the export sizes of every shared model")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tune_malloc()  # as dacnn train does (dacnn.runtime)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*json.loads(args.memory_child))
        return
    if args.sizes:
        print(export_sizes())
        return
    wanted = set(args.models.split(",")) if args.models else None
    rows = []
    start = time.perf_counter()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; input {INPUT}, float32, eval; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for label, name, kwargs, attrs in MODELS:
        if wanted and name not in wanted:
            continue
        models = {v: build(name, kwargs, v, attrs) for v in ("shared", "free")}
        check_twin(models["shared"], models["free"], label)
        speed = measure_speed(models, reps1=6 * args.reps, reps64=args.reps)
        with tempfile.TemporaryDirectory() as tmp:
            for variant, model in models.items():
                counts = dacnn.count_params(model)
                row = {
                    "model": label,
                    "variant": variant,
                    "unique_params": counts.unique,
                    "per_use_params": counts.per_use,
                    "gflops": dacnn.count_flops(model, INPUT) / 1e9,
                    "checkpoint_bytes": checkpoint_bytes(model, tmp),
                    "peak_mem_mb_b64": measure_memory(name, kwargs, variant, attrs),
                    **speed[variant],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.1f}\n")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def export_sizes() -> str:
    """Markdown table: compact export bytes of every registered shared model in fp32/fp16/int8."""
    lines = [
        "| model | unique params | buffers | per-use params | fp32 bytes | ratio | fp16 bytes | ratio "
        "| int8 bytes | int8/fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in dacnn.list_models():
            model = dacnn.create_model(name)
            counts = dacnn.count_params(model)
            if not counts.shared:
                continue
            info = {
                d: export_safetensors(model, Path(tmp) / f"{d}.safetensors", d)
                for d in ("fp32", "fp16", "int8")
            }
            lines.append(
                f"| {name} | {counts.unique:,} | {info['fp32'].buffer_values:,} | {counts.per_use:,} "
                f"| {info['fp32'].file_bytes:,} | {info['fp32'].size_ratio:.4f} "
                f"| {info['fp16'].file_bytes:,} | {info['fp16'].size_ratio:.4f} "
                f"| {info['int8'].file_bytes:,} | {info['int8'].file_bytes / info['fp32'].file_bytes:.3f} |"
            )
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | weights | unique params | checkpoint | GFLOP/img | latency b=1 | throughput b=64 "
        "| peak act. mem b=64 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["variant"]] = r
    for label, pair in by_model.items():
        for variant in ("shared", "free"):
            r = pair[variant]
            lines.append(
                f"| {label} | {variant} | {r['unique_params']:,} | {r['checkpoint_bytes'] / 1e6:.2f} MB "
                f"| {r['gflops']:.2f} | {r['latency_ms']:.1f} ms | {r['throughput']:.0f} img/s "
                f"| {r['peak_mem_mb_b64']:.0f} MB |"
            )
        s, f = pair["shared"], pair["free"]
        lines.append(
            f"| {label} | shared / free | {s['unique_params'] / f['unique_params']:.3f} "
            f"| {s['checkpoint_bytes'] / f['checkpoint_bytes']:.3f} | {s['gflops'] / f['gflops']:.2f} "
            f"| {s['latency_ms'] / f['latency_ms']:.2f} | {s['throughput'] / f['throughput']:.2f} "
            f"| {s['peak_mem_mb_b64'] / max(f['peak_mem_mb_b64'], 1e-9):.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
