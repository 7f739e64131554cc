"""The speed settings a run gets when its config leaves them unset (``None`` / ``"auto"``).

Defaults are what measured faster (docs/performance.md), per device and model family:

* **CUDA**: bf16 autocast, channels_last and ``torch.compile`` for every family (the tensor cores
  want bf16 and NHWC; compilation pays back over a paper-scale run). ``--amp fp16`` trains through
  a ``GradScaler`` instead.
* **CPU**: fp32 (``--amp bf16`` is emulated on a CPU without bf16 hardware, about 10x slower; see
  :func:`dacnn.runtime.warn_slow_amp` for the measurement), no compilation (``--compile`` adds at
  most ~10 % on this kind of CPU after a 20-76 s warm-up: worth it only for runs of many epochs), and
  channels_last per family as ``benchmarks/memory_format.py`` measured it (:data:`CPU_CHANNELS_LAST`).

Set any of them explicitly to override; the resolved values are printed at the start of a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dacnn.registry import model_info
from dacnn.train.config import TrainConfig

__all__ = ["Speed", "resolve_speed", "CPU_CHANNELS_LAST"]

# benchmarks/memory_format.py on the shared 2-core development machine (training step at batch 64,
# NCHW time / channels_last time, medians of 4 interleaved steps under heavy load, commit 736cf74):
# dacnn14 w32 3.51, w128 0.89 (end_to_end measured +28 % / +12 % end to end with channels_last, and
# PERFORMANCE.md 0.44 -> 0.54 of the matmul rate at w128: on); resnet18 0.95, se_resnet_d_2_shared
# 0.98, vgg16_1fc 1.01 (no gain: NCHW). LruNet's fast path works in channels_last whatever its input,
# so its input comes channels_last. Families not listed (measured or not) stay NCHW.
CPU_CHANNELS_LAST: dict[str, bool] = {"dacnn": True, "lrunet": True}


@dataclass(frozen=True)
class Speed:
    """The resolved speed settings of one run."""

    channels_last: bool
    compile: bool
    amp: str  # none, bf16, fp16

    def describe(self) -> str:
        parts = ["channels_last" if self.channels_last else "NCHW", f"amp {self.amp}"]
        if self.compile:
            parts.append("compiled")
        return ", ".join(parts)


def _family(model: str | None) -> str | None:
    try:
        return model_info(model).family if model is not None else None
    except KeyError:
        return None


def resolve_speed(cfg: TrainConfig, device: torch.device) -> Speed:
    """``cfg``'s channels_last / compile / amp, with unset values filled in for ``device``."""
    cuda = device.type == "cuda"
    channels_last = cfg.channels_last
    if channels_last is None:
        channels_last = cuda or CPU_CHANNELS_LAST.get(_family(cfg.model) or "", False)
    compile_ = cfg.compile if cfg.compile is not None else cuda
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if cuda else "none")
    return Speed(channels_last=bool(channels_last), compile=bool(compile_), amp=amp)
