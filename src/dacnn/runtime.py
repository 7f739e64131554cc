"""Process-level speed settings: the allocator and what the CPU can do.

PyTorch's CPU allocator has no cache of its own: every activation is a ``malloc`` and a ``free``.
glibc serves blocks above its mmap threshold (128 KiB to 32 MiB, adaptive) with ``mmap`` and gives
them back with ``munmap``, and trims the heap top when more than 128 KiB is free, so each training
step page-faults its activations in again (25-30 % system time in a ``dacnn train`` run; docs/performance.md).
:func:`tune_malloc` sets glibc's ``M_MMAP_MAX=0`` (every block from the heap) and a never-reached
``M_TRIM_THRESHOLD`` at run time through ``mallopt``: the same as the environment variables
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``, without re-executing the process. Memory freed
by a step stays mapped and is reused by the next; the peak resident size is unchanged.
``benchmarks/end_to_end.py`` measures the gain side by side.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import warnings

import torch

__all__ = ["tune_malloc", "malloc_tuned", "cpu_has_bf16", "warn_slow_amp", "idle_cores"]

# <malloc.h>: "mallopt options that actually do something"
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int; 2 GiB is the largest it accepts

_state = {"tuned": False}


def tune_malloc() -> bool:
    """Keep freed memory in glibc's heap for the rest of the process (no ``mmap`` per large block,
    no trimming). Returns whether it applied: False on a non-glibc libc, when the environment
    variable ``DACNN_TUNE_MALLOC=0`` opts out, or when ``MALLOC_MMAP_MAX_`` is already set (the
    user's own glibc tunables win). Idempotent; call it once at process start."""
    if _state["tuned"]:
        return True
    if os.environ.get("DACNN_TUNE_MALLOC", "1") == "0" or "MALLOC_MMAP_MAX_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _state["tuned"] = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _TRIM_NEVER))
    return _state["tuned"]


def malloc_tuned() -> bool:
    """Whether :func:`tune_malloc` applied in this process."""
    return _state["tuned"]


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX) that oneDNN uses."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def warn_slow_amp(device: torch.device, amp: str) -> None:
    """Warn that ``amp='bf16'`` on a CPU without bf16 hardware is emulated: a DACNN-14 w32 train step
    ran 10.2x slower than fp32 on an AMD EPYC Zen 4 limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/train_throughput.py --models dacnn14@32 --modes
    cl,cl+bf16``; 1.56x faster with the Zen 4's bf16 hardware). ``fp16`` on a CPU is ignored by
    autocast."""
    if device.type == "cpu" and amp == "bf16" and not cpu_has_bf16():
        warnings.warn("--amp bf16 on a CPU without bf16 hardware (no AVX512-BF16/AMX) is emulated and "
                      "about 10x slower than fp32; drop --amp", stacklevel=2)


def idle_cores() -> int:
    """Cores not busy with other processes: the CPU count minus the 1-minute load average, at least
    one. OpenMP threads that share a core with another busy process spin at every barrier: a
    2-thread run on a 2-core machine fell from 603 to 69-88 img/s when another process was busy,
    while a 1-thread run kept its speed (docs/performance.md); on an idle machine all cores are used."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        return cores
    return max(1, min(cores, int(cores - busy + 0.5)))
