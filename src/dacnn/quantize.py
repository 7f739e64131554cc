"""Per-output-channel symmetric int8 quantisation of convolution and linear weights.

For a weight ``W`` of shape ``(out, ...)`` each output channel ``c`` gets one scale
``s_c = max|W_c| / 127`` and is stored as ``q_c = round(W_c / s_c)`` clipped to ``[-127, 127]``
(symmetric: no zero point, -128 unused). Dequantising gives ``W_c ~ s_c * q_c`` with an error of at
most ``s_c / 2`` per value. A shared kernel is one tensor, so it is quantised once and every use
applies the same dequantised values (tying survives quantisation).
"""

from __future__ import annotations

import torch

__all__ = ["QMAX", "quantize_per_channel", "dequantize_per_channel", "is_quantizable"]

QMAX = 127


def is_quantizable(tensor: torch.Tensor) -> bool:
    """Conv and linear weights (floating, at least 2-D) are quantised; vectors stay float."""
    return tensor.is_floating_point() and tensor.dim() >= 2


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` -> ``(q int8 same shape, scale float32 of shape (out,))``; all-zero channels get scale 1."""
    w = weight.detach().to(torch.float32)
    amax = w.abs().flatten(1).amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    view = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(w / scale.view(view)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 weight ``scale[c] * q[c]`` (inverse of :func:`quantize_per_channel` up to rounding)."""
    view = (-1,) + (1,) * (q.dim() - 1)
    return q.to(torch.float32) * scale.to(torch.float32).view(view)
