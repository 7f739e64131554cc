"""LruNet's fused training iteration: one autograd node for shuffle, duplicate, dw, BN, pw, BN, add, ReLU.

One reuse iteration of an :class:`~dacnn.models.lrunet.LruBlock` in train mode (arXiv 1901.09615,
Fig. 2; the reference code's op order) is::

    s = shuffle(x)            # channel_shuffle, or x itself in the first iteration
    a = dw(s)                 # depthwise 3x3, channel multiplier 2
    c = pw(BN1(a))            # grouped 1x1 (groups 8)
    y = relu(BN2(c) + s)      # BN1, BN2 with batch statistics, as nn.BatchNorm2d in train mode

:class:`LruIteration` computes exactly that (same batch statistics, same running-statistics update
through ``torch.batch_norm_update_stats``, the kernel ``nn.BatchNorm2d`` itself uses) in fewer passes
over memory, with its backward written out:

* ``dw`` with multiplier 2 on ``s`` is a plain depthwise conv (multiplier 1) on ``d``, ``s`` with every
  channel repeated twice, which oneDNN runs 3-10x faster; ``d`` is one ``index_select`` of ``x``'s
  channels (shuffle and repeat in one pass) and ``s`` is the view ``d[:, ::2]``. Backward: each
  channel's two copies and the residual's gradient summed in one pass each, then one ``index_select``
  undoes the shuffle.
* BN1 is folded into the pw conv: ``pw(a * s1 + t1) = conv(a, W * s1) + W t1`` with ``s1 = g1 / sigma1``
  and ``t1 = b1 - mu1 s1`` from the batch statistics; BN1's output is never written. Its backward
  follows from the pw conv's weight gradient ``sum_n gc a^T`` (``sum_n gb (a - mu1)`` is
  ``W^T`` of it), so BN1 costs one statistics pass forward and one fused elementwise pass backward.
* BN2, the residual add and the ReLU are one ``addcmul`` and one in-place ``add_`` + ``relu_``; the
  backward uses ATen's BatchNorm backward.
* Where a pw group reads at most 16 channels (stage 1 of LruNet-1x) the pw conv's forward and input
  gradient run as a conv with half the groups and block-diagonal weights (:func:`_paired_groups`);
  where it reads at most 32 (stages 1-2) its weight gradient is one ``bmm`` over the pixel rows.

Saved for backward per iteration: ``d``, ``a``, ``c``, ``y`` (the op-by-op graph also keeps BN1's
output). ``tests/test_lrunet.py`` checks it against the reference op sequence (float64
``gradcheck`` and float32 step, running statistics included).

Every op here is public ATen with kernels for every device and floating dtype (no ``_add_relu_``:
a CPU fp32/fp64-only private op, 0.7 ms faster per 8 M-element call than ``add_`` + ``relu_``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["LruIteration", "add_relu_", "shuffle_duplicate", "shuffle_duplicate_backward"]

def add_relu_(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``relu(out + x)`` written into ``out`` (every device and dtype)."""
    return torch.relu_(out.add_(x))


_conv_backward = torch.ops.aten.convolution_backward
_bn_backward = torch.ops.aten.native_batch_norm_backward


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` tensor -> the contiguous ``(B, H, W, C)`` view of its channels-last copy."""
    return x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=64)
def _channel_orders(c: int, shuffle: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dup, unshuffle)`` index vectors for ``c`` channels: ``d = x[:, dup]`` is the shuffled input
    with every channel repeated (``dup[2k] = dup[2k + 1]`` = the input channel of ``s[k]``), and
    ``gx = gs[:, unshuffle]`` takes a gradient in ``s``'s order back to ``x``'s (the inverse
    permutation). Without the shuffle ``s`` is ``x``."""
    j = torch.arange(c // 2)
    source = torch.stack([c // 2 + j, j], 1).flatten() if shuffle else torch.arange(c)  # s[k] = x[source[k]]
    return source.repeat_interleave(2).to(device), torch.argsort(source).to(device)


def _orders(c: int, shuffle: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_channel_orders`, uncached under ``torch.compile``/``torch.export`` (a traced call
    would leave fake tensors in the cache for the eager calls after it)."""
    if torch.compiler.is_compiling():
        return _channel_orders.__wrapped__(c, shuffle, device)
    return _channel_orders(c, shuffle, device)


def shuffle_duplicate(x: torch.Tensor, shuffle: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, d)``: ``s`` = the reference channel shuffle of ``x`` (swap the halves, then the
    2-group shuffle: ``s[2j] = x[C/2 + j]``, ``s[2j + 1] = x[j]``), or ``x`` when ``shuffle`` is
    False, and ``d`` = ``s`` with every channel repeated (``d[2c] = d[2c + 1] = s[c]``), channels-last.

    ``d`` is one ``index_select`` of the channels of ``x``'s pixel rows (a single pass over memory)
    and ``s`` is its view ``d[:, ::2]``. Differentiable (plain ops)."""
    xh = _nhwc(x)
    b, h, w, c = xh.shape
    dup, _ = _orders(c, shuffle, x.device)
    d = _nchw(xh.reshape(b * h * w, c).index_select(1, dup).view(b, h, w, 2 * c))
    return d[:, ::2], d


def shuffle_duplicate_backward(
    grad_d: torch.Tensor, shuffle: bool, grad_s: torch.Tensor | None = None
) -> torch.Tensor:
    """Gradient with respect to ``x`` of :func:`shuffle_duplicate` given the gradient at ``d`` (and,
    optionally, a gradient ``grad_s`` at ``s`` too, e.g. a residual's): sum each channel's two
    copies (plus ``grad_s``) in ``s``'s order, then undo the shuffle with one ``index_select``."""
    gh = _nhwc(grad_d)
    b, h, w, c2 = gh.shape
    c = c2 // 2
    pairs = gh.reshape(b * h * w, c, 2)
    gs = torch.add(pairs[..., 0], pairs[..., 1])
    if grad_s is not None:
        gs.add_(_nhwc(grad_s).reshape(b * h * w, c))
    if shuffle:
        gs = gs.index_select(1, _orders(c, shuffle, grad_d.device)[1])
    return _nchw(gs.view(b, h, w, c))


def _paired_groups(weight: torch.Tensor, groups: int) -> tuple[torch.Tensor, int]:
    """A grouped 1x1 conv's weight as the same conv with half as many groups, each pair of groups
    one block-diagonal group (zeros off the diagonal), when each group reads at most 16 channels:
    there oneDNN runs the wider groups faster for the forward pass and the input gradient (the
    added terms are exact zeros). Otherwise ``(weight, groups)`` unchanged."""
    q, k = weight.shape[0], weight.shape[1]
    if k > 16 or groups % 2:
        return weight, groups
    blocks = weight.new_zeros(groups // 2, 2, q // groups, 2, k)
    wg = weight.view(groups // 2, 2, q // groups, k)
    blocks[:, 0, :, 0] = wg[:, 0]
    blocks[:, 1, :, 1] = wg[:, 1]
    return blocks.view(q, 2 * k, 1, 1), groups // 2


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


class LruIteration(torch.autograd.Function):
    """``y = relu(BN2(pw(BN1(dw(s)))) + s)``, ``s = shuffle(x)`` (module docstring), BatchNorm in
    train mode: batch statistics, running statistics updated in place with ``momentum`` (the factor
    ``nn.BatchNorm2d`` computes, incl. its cumulative average when its momentum is None).

    ``apply(x, shuffle, w_dw, b_dw, w_pw, b_pw, bn1, bn2)`` where ``bn1``/``bn2`` are
    ``(weight, bias, running_mean, running_var, momentum, eps)``; ``w_pw`` has ``groups`` =
    ``2C / w_pw.shape[1]``. First-order gradients only (a double backward raises; ``fast=False``
    supports it).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, shuffle: bool, w_dw: torch.Tensor, b_dw: torch.Tensor | None,
        w_pw: torch.Tensor, b_pw: torch.Tensor | None, g1: torch.Tensor, be1: torch.Tensor,
        g2: torch.Tensor, be2: torch.Tensor, bn1: tuple, bn2: tuple,
    ) -> torch.Tensor:
        s, d = shuffle_duplicate(x, shuffle)
        q2 = d.shape[1]
        q, k = w_pw.shape[0], w_pw.shape[1]
        groups = q2 // k
        a = F.conv2d(d, w_dw, b_dw, 1, 1, 1, q2)
        rm1, rv1, mom1, eps1 = bn1
        mu1, var1 = torch.batch_norm_update_stats(a, rm1, rv1, mom1)
        r1 = torch.rsqrt(var1 + eps1)
        s1 = g1 * r1
        t1 = be1 - mu1 * s1
        wp = w_pw.view(groups, q // groups, k)
        w_eff = (wp * s1.view(groups, 1, k)).view_as(w_pw)
        bias = torch.bmm(wp, t1.view(groups, k, 1)).view(q)
        if b_pw is not None:
            bias = bias + b_pw
        w_wide, wide_groups = _paired_groups(w_eff, groups)
        c = F.conv2d(a, w_wide, bias, 1, 0, 1, wide_groups)
        rm2, rv2, mom2, eps2 = bn2
        mu2, var2 = torch.batch_norm_update_stats(c, rm2, rv2, mom2)
        r2 = torch.rsqrt(var2 + eps2)
        s2 = g2 * r2
        y = torch.addcmul(_per_channel(be2 - mu2 * s2), c, _per_channel(s2))
        y = add_relu_(y, s)  # relu(y + s), one pass on a CPU
        ctx.save_for_backward(d, a, c, y, w_dw, w_pw, w_eff, w_wide, g2, mu1, r1, s1, t1, mu2, r2)
        ctx.shuffle, ctx.eps2, ctx.groups, ctx.wide_groups = shuffle, eps2, groups, wide_groups
        ctx.dw_bias, ctx.pw_bias = b_dw is not None, b_pw is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        d, a, c, y, w_dw, w_pw, w_eff, w_wide, g2, mu1, r1, s1, t1, mu2, r2 = ctx.saved_tensors
        groups, q2 = ctx.groups, d.shape[1]
        q, k = w_pw.shape[0], w_pw.shape[1]
        n = a.numel() // q2
        ge = torch.ops.aten.threshold_backward(gy.contiguous(memory_format=torch.channels_last), y, 0)
        gc, gg2, gbe2 = _bn_backward(ge, c, g2, None, None, mu2, r2, True, ctx.eps2, [True, True, True])
        # pw conv (weight W * s1, input a): ga_pw = s1 * gb, where gb is the gradient at BN1's output
        ga = _conv_backward(gc, a, w_wide, None, [1, 1], [0, 0], [1, 1], False, [0, 0], ctx.wide_groups,
                            [True, False, False])[0]
        if k <= 32:  # narrow groups: the weight gradient as one bmm over the pixel rows is faster
            gcr, ar = _nhwc(gc).reshape(n, groups, q // groups), _nhwc(a).reshape(n, groups, k)
            gw_eff = torch.bmm(gcr.permute(1, 2, 0), ar.transpose(0, 1))
            sum_gc = gcr.sum(0).view(q)
        else:
            _, gw_eff, sum_gc = _conv_backward(gc, a, w_eff, [q], [1, 1], [0, 0], [1, 1], False,
                                               [0, 0], groups, [False, True, True])
        wp = w_pw.view(groups, q // groups, k)
        gwe = gw_eff.view(groups, q // groups, k)
        sgc = sum_gc.view(groups, q // groups, 1)
        g_wpw = (gwe * s1.view(groups, 1, k) + sgc * t1.view(groups, 1, k)).view_as(w_pw)
        # BN1: sum_n gb = W^T sum_n gc, sum_n gb (a - mu1) = (W * sum_n gc a^T) summed over outputs
        sum_gb = (wp * sgc).sum(1).view(q2)
        gg1 = r1 * ((wp * gwe).sum(1).view(q2) - mu1 * sum_gb)  # sum_n gb * a_hat
        beta = -s1 * r1 * gg1 / n
        alpha = -s1 * sum_gb / n - beta * mu1
        ga.addcmul_(a, _per_channel(beta)).add_(_per_channel(alpha))
        gd, g_wdw, g_bdw = _conv_backward(ga, d, w_dw, [q2] if ctx.dw_bias else None, [1, 1], [1, 1],
                                          [1, 1], False, [0, 0], q2, [True, True, ctx.dw_bias])
        gx = shuffle_duplicate_backward(gd, ctx.shuffle, ge)  # ge: the residual's gradient at s
        return (gx, None, g_wdw, g_bdw if ctx.dw_bias else None, g_wpw, sum_gc if ctx.pw_bias else None,
                gg1, sum_gb, gg2, gbe2, None, None)
