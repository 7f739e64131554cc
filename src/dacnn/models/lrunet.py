"""LruNet: convolutional networks with layer reuse (Köpüklü et al., arXiv 1901.09615; SPEC.md 2.1).

``N``-LruNet-``w``x: a stride-2 3x3 stem (64 channels), four :class:`LruBlock` stages at
``w * (64, 128, 256, 512)`` channels joined by 3x3/2 max-pooling and channel doubling (the tensor
concatenated with itself), and a grouped 1x1 classifier (BN, ReLU, dropout 0.5, 1x1 conv, **ReLU on
the logits**, 2x2 average pooling).

A block (paper Fig. 2) owns two kernels, a depthwise 3x3 conv with channel multiplier 2 (``q -> 2q``,
groups ``q``) and a grouped pointwise conv (``2q -> q``, groups 8), each a
:class:`~dacnn.shared_kernel.SharedKernel` applied ``N`` times ("layer reuse"). Iteration ``i``:
``y = relu(BN_pw_i(pw(BN_dw_i(dw(x)))) + x)``, followed (except after the last) by the channel
shuffle of the reference code: swap the two halves, then the 2-group shuffle. Every iteration has
its own two BatchNorms; no activation between ``dw`` and ``pw``.

The arithmetic is the reference's; the execution is reorganised for speed (``LruBlock.fast``, on by
default; ``False`` runs the reference's op sequence): channels-last tensors; the multiplier-2
depthwise conv as a multiplier-1 depthwise conv on a channel-duplicated input, duplicated together
with the shuffle (:func:`~dacnn.models.lrunet_ops.shuffle_duplicate`); in train mode each iteration
one autograd node with BN1 folded into the pw conv (:class:`~dacnn.models.lrunet_ops.LruIteration`);
in eval mode each iteration's
BatchNorms folded into per-iteration kernel copies and, in the narrow stages, dw, pw and the
residual merged into one grouped 3x3 conv. ``benchmarks/lrunet_speed.py`` measures the gain.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from dacnn.errors import CheckpointError, ConfigError
from dacnn.hub import PretrainedCfg
from dacnn.models.base import ClassifierMixin, Stage, check_drop_path
from dacnn.models.layers import fold_bn
from dacnn.models.lrunet_ops import LruIteration, _nchw, _nhwc, add_relu_, shuffle_duplicate
from dacnn.registry import ModelInfo, build_model_with_cfg, register_model, register_pretrained
from dacnn.shared_kernel import AnchoredConv2d, SharedKernel

__all__ = ["LruBlock", "LruNet", "channel_shuffle", "checkpoint_filter_fn", "config_from_state"]

PAPER = "arXiv 1901.09615"
STAGE_WIDTHS = (64, 128, 256, 512)
STEM_WIDTH = 64
PW_GROUPS = 8


def channel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """The reference shuffle, written as it is: swap the two channel halves, then the 2-group
    shuffle (view ``(2, C/2)``, transpose, flatten). Output channel ``2j`` is input ``C/2 + j``,
    ``2j + 1`` is input ``j``. (No shape unpacking, so ``torch.fx`` can trace it.)"""
    half = x.shape[1] // 2
    x = torch.cat([x[:, half:], x[:, :half]], 1)
    return x.unflatten(1, (2, -1)).transpose(1, 2).flatten(1, 2)


def _is_tracing() -> bool:
    """Whether a tracer or a ``torch.func`` transform (``vmap``, ``grad``) sees this call: they get
    the reference op sequence (the fast paths ask for memory formats and run autograd Functions
    without functorch rules)."""
    return bool(
        torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
        or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        or torch._C._functorch.maybe_current_level() is not None
    )


def _has_hooks(module: nn.Module) -> bool:
    """Whether a forward (pre-)hook would see a call the fused fast path skips: one on any
    submodule of ``module`` (a kernel, a use, a BatchNorm) or a global module hook."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules() if m is not module)


def _bn_state(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(running_mean, running_var, momentum, eps)`` for one train-mode step of ``bn``, advancing
    its ``num_batches_tracked`` exactly as ``nn.BatchNorm2d.forward`` does (the cumulative average
    ``1 / num_batches_tracked`` when ``momentum`` is None)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    return bn.running_mean, bn.running_var, factor, bn.eps


def _kernel_of(use: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias an (anchored or, after :func:`dacnn.untie`, free) conv applies."""
    owner = use.kernel if isinstance(use, AnchoredConv2d) else use
    return owner.weight, owner.bias


def _merge_dw_pw(
    w_dw: torch.Tensor, b_dw: torch.Tensor, w_pw: torch.Tensor, b_pw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x + pw(dw(x))`` as one 3x3 conv with ``groups=8``: pw group ``g`` reads dw channels
    ``[gK, (g+1)K)`` (``K = 2q/8``), which come from input channels ``[gK/2, (g+1)K/2)``, so
    ``W[o, c] = sum_m W_pw[o, 2c+m] W_dw[g K + 2c + m]`` and ``b = b_pw + W_pw b_dw``; the
    residual is a 1 at the centre tap of ``W[o, o mod (q/8)]`` (input ``o`` is in ``o``'s group)."""
    q = w_pw.shape[0]
    k = w_pw.shape[1]
    pw = w_pw.reshape(PW_GROUPS, q // PW_GROUPS, k)
    dw = w_dw.reshape(PW_GROUPS, 1, k, 9)
    weight = (pw.unsqueeze(-1) * dw).reshape(PW_GROUPS, q // PW_GROUPS, k // 2, 2, 9).sum(3)
    weight = weight.reshape(q, k // 2, 3, 3)
    identity = torch.zeros_like(weight)
    identity[torch.arange(q), torch.arange(q) % (k // 2), 1, 1] = 1.0
    bias = b_pw + torch.bmm(pw, b_dw.reshape(PW_GROUPS, k, 1)).reshape(q)
    return weight + identity, bias


def _shuffle_rows(x: torch.Tensor) -> torch.Tensor:
    """:func:`channel_shuffle` of a channels-last tensor in two vectorised copies (no duplicate
    needed): swap the halves (``index_select`` of 2 blocks per pixel), then ``torch.channel_shuffle``."""
    xh = _nhwc(x)
    b, h, w, c = xh.shape
    rows = xh.reshape(-1, 2, c // 2).index_select(1, torch.tensor([1, 0], device=x.device))
    return torch.channel_shuffle(_nchw(rows.view(b, h, w, c)), 2)


class LruBlock(nn.Module):
    """One LruNet stage: a depthwise (``q -> 2q``) and a pointwise (``2q -> q``, groups 8) kernel
    reused ``layer_reuse`` times, each use with its own BatchNorm.

    ``forward`` follows the reference op for op when ``fast`` is False (and while being traced or
    exported); otherwise it computes the same function in fewer, cheaper passes (channels-last,
    :func:`~dacnn.models.lrunet_ops.shuffle_duplicate`, in train mode one fused autograd node per
    iteration, in eval mode BatchNorm folded into per-iteration kernel copies).
    """

    def __init__(self, planes: int, layer_reuse: int, fast: bool = True) -> None:
        super().__init__()
        if planes % PW_GROUPS:
            raise ConfigError(f"LruBlock: planes={planes} must be divisible by {PW_GROUPS}")
        self.planes, self.layer_reuse, self.fast = planes, layer_reuse, fast
        dw = SharedKernel(planes, 2 * planes, 3, groups=planes)
        pw = SharedKernel(2 * planes, planes, 1, groups=PW_GROUPS)
        self.kernels = nn.ModuleDict({"dw": dw, "pw": pw})
        self.dw_uses = nn.ModuleList(AnchoredConv2d(dw, padding=1) for _ in range(layer_reuse))
        self.pw_uses = nn.ModuleList(AnchoredConv2d(pw, padding=0) for _ in range(layer_reuse))
        self.dw_bns = nn.ModuleList(nn.BatchNorm2d(2 * planes) for _ in range(layer_reuse))
        self.pw_bns = nn.ModuleList(nn.BatchNorm2d(planes) for _ in range(layer_reuse))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast or _has_hooks(self) or _is_tracing():  # a hooked module must be called
            return self._forward_reference(x)
        frozen = all(bn.running_mean is not None for bn in (*self.dw_bns, *self.pw_bns))
        folding = not self.training and frozen
        fused = not folding and self._fusable()
        if self._skipped_modules_hooked(folding or fused):  # a hook expects its module to be called
            return self._forward_reference(x)
        if folding:
            return self._forward_eval(x)
        if fused:
            return self._forward_fused(x)
        q2 = 2 * self.planes
        for i in range(self.layer_reuse):
            x, x2 = shuffle_duplicate(x, i > 0)
            (w_dw, b_dw), (w_pw, b_pw) = _kernel_of(self.dw_uses[i]), _kernel_of(self.pw_uses[i])
            h = self.dw_bns[i](F.conv2d(x2, w_dw, b_dw, 1, 1, 1, q2))
            out = self.pw_bns[i](F.conv2d(h, w_pw, b_pw, 1, 0, 1, PW_GROUPS))
            x = torch.relu_(out.add_(x))
        return x

    def _fusable(self) -> bool:
        """Whether :class:`~dacnn.models.lrunet_ops.LruIteration` computes what the BatchNorms would:
        every one a plain ``nn.BatchNorm2d`` in train mode with affine weights and running
        statistics, and no autocast (it would change the dtypes inside)."""
        if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
            return False
        return all(type(bn) is nn.BatchNorm2d and bn.training and bn.affine and bn.track_running_stats
                   and bn.running_mean is not None for bn in (*self.dw_bns, *self.pw_bns))

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Train mode, one :class:`~dacnn.models.lrunet_ops.LruIteration` per reuse: the same
        batch statistics, running-statistics update and step counter as ``nn.BatchNorm2d``."""
        for i in range(self.layer_reuse):
            (w_dw, b_dw), (w_pw, b_pw) = _kernel_of(self.dw_uses[i]), _kernel_of(self.pw_uses[i])
            bn1, bn2 = self.dw_bns[i], self.pw_bns[i]
            x = LruIteration.apply(x, i > 0, w_dw, b_dw, w_pw, b_pw, bn1.weight, bn1.bias, bn2.weight,
                                   bn2.bias, _bn_state(bn1), _bn_state(bn2))
        return x

    def _skipped_modules_hooked(self, bn_skipped: bool) -> bool:
        """Whether a module the fast path does not call has hooks: the kernels (gone after
        :func:`dacnn.untie`), every conv use and, when BN is folded (eval) or fused (train), every
        BatchNorm."""
        skipped = [*self.kernels.values(), *self.dw_uses, *self.pw_uses]
        if bn_skipped:
            skipped += [*self.dw_bns, *self.pw_bns]
        return any(m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in skipped)

    def _forward_eval(self, x: torch.Tensor) -> torch.Tensor:
        """Eval mode: each iteration's BNs folded into its kernel copies. With ``q/8 <= 16`` channels
        per group the dw->pw pair (linear, no activation between) is also merged into one grouped
        3x3 conv (``groups=8``), cheaper there than duplicating the input for the depthwise conv."""
        q, q2 = self.planes, 2 * self.planes
        merge = q // PW_GROUPS <= 16
        for i in range(self.layer_reuse):
            (w_dw, b_dw), (w_pw, b_pw) = _kernel_of(self.dw_uses[i]), _kernel_of(self.pw_uses[i])
            w_dw, b_dw = fold_bn(w_dw, b_dw, self.dw_bns[i])
            w_pw, b_pw = fold_bn(w_pw, b_pw, self.pw_bns[i])
            if merge:
                x = _shuffle_rows(x) if i > 0 else x.contiguous(memory_format=torch.channels_last)
                x = torch.relu_(F.conv2d(x, *_merge_dw_pw(w_dw, b_dw, w_pw, b_pw), 1, 1, 1, PW_GROUPS))
            else:
                x, x2 = shuffle_duplicate(x, i > 0)
                out = F.conv2d(F.conv2d(x2, w_dw, b_dw, 1, 1, 1, q2), w_pw, b_pw, 1, 0, 1, PW_GROUPS)
                x = add_relu_(out, x)
        return x

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.layer_reuse):
            out = self.pw_bns[i](self.pw_uses[i](self.dw_bns[i](self.dw_uses[i](x))))
            x = F.relu(out + x)
            if i != self.layer_reuse - 1:
                x = channel_shuffle(x)
        return x


class LruNet(ClassifierMixin, nn.Module):
    """``layer_reuse``-LruNet-``width_mult``x for 32x32 (CIFAR) or 28x28 (Fashion-MNIST) input.

    ``fast=False`` runs the reference's op sequence in every block (``--model-kwargs fast=false``
    on the command line); the default computes the same function faster (:class:`LruBlock`).

    timm's interface: :meth:`forward_features` ends after stage 4 (``(B, 512w, 2, 2)`` at 32x32,
    ``num_features = 512w``); :meth:`forward_head` is the grouped 1x1 head: ``pre_logits`` (conv, BN,
    ReLU, dropout ``drop_rate``, the paper's 0.5), then the logits conv ``fc``, ReLU and 2x2 average
    pooling; ``pre_logits=True`` stops before ``fc``, so the features are ``(B, 256w, H, W)``
    (``head_hidden_size = 256w``): the reference pools *after* its ReLU on the logits, so there is no
    pooled pre-logits vector. ``global_pool="avg"`` is that 2x2 average pooling (global on the 2x2 map of
    its 32x32 and 28x28 inputs), ``""`` none (the head returns the logit maps). A block's kernels are
    ``stage<k>.kernels.dw`` / ``.pw``. The feature levels are the stem and the four stages (each with
    the max-pool after it). ``drop_path_rate`` must be 0: the fused iteration has no stochastic depth.

    timm's ``train.py`` always passes ``drop_rate`` (0 unless ``--drop``): pass ``--drop 0.5`` there for
    the paper's dropout.
    """

    global_pool = "avg"
    pool_types = ("avg", "")

    # names before 2026-12 (still loaded): stage<k>.dw/.pw, classifier.0-3 and classifier.4
    legacy_keys = ((r"^(stage\d)\.(dw|pw)\.", r"\1.kernels.\2."), (r"^classifier\.4\.", "fc."),
                   (r"^classifier\.", "pre_logits."))

    def __init__(
        self,
        layer_reuse: int = 8,
        width_mult: int = 1,
        *,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.5,
        fast: bool = True,
        global_pool: str = "avg",
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        check_drop_path("LruNet", drop_path_rate, "its fused reuse iterations have none")
        if isinstance(width_mult, float) and width_mult.is_integer():
            width_mult = int(width_mult)
        if not isinstance(width_mult, int) or width_mult < 1:
            raise ConfigError(
                f"LruNet: width_mult must be a positive integer (the reference trains 1 and 2; its "
                f"64-channel stem is tiled to 64*width), got {width_mult!r}"
            )
        if layer_reuse < 1:
            raise ConfigError(f"LruNet: layer_reuse must be >= 1, got {layer_reuse}")
        self.layer_reuse, self.width_mult, self.num_classes = layer_reuse, width_mult, num_classes
        widths = [width_mult * c for c in STAGE_WIDTHS]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, STEM_WIDTH, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(STEM_WIDTH),
            nn.ReLU(inplace=True),
        )
        self.stage1, self.stage2, self.stage3, self.stage4 = (LruBlock(c, layer_reuse, fast) for c in widths)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        head = 256 * width_mult
        self.num_features, self.drop_rate = widths[-1], drop_rate
        self._set_pool(global_pool)
        self.head_hidden_size = head
        self.feature_info = [dict(num_chs=STEM_WIDTH * width_mult, reduction=2, module="stem")] + [
            dict(num_chs=c, reduction=r, module=f"stage{k}")
            for k, c, r in zip(range(1, 5), widths, (4, 8, 8, 16))]
        self.pre_logits = nn.Sequential(
            nn.Conv2d(widths[-1], head, 1, groups=PW_GROUPS, bias=False),
            nn.BatchNorm2d(head),
            nn.ReLU(inplace=True),
            nn.Dropout(drop_rate),
        )
        self.fc = nn.Conv2d(head, num_classes, 1) if num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """The reference init: Kaiming-normal (fan_out) on every conv weight (a shared kernel through
        its own :meth:`~dacnn.SharedKernel.reset_parameters`), conv biases left at PyTorch's default,
        BN weight 1 / bias 0."""
        for m in self.modules():
            if isinstance(m, SharedKernel):
                m.reset_parameters()
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(x)
        return torch.cat([out] * self.width_mult, 1) if self.width_mult > 1 else out

    def _stage1(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stage1(x))

    def _stage2(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stage2(torch.cat([x, x], 1)))

    def _stage3(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage3(torch.cat([x, x], 1))

    def _stage4(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stage4(torch.cat([x, x], 1)))

    def _stages(self) -> list[Stage]:
        return [self._stem, self._stage1, self._stage2, self._stage3, self._stage4]

    def _group_patterns(self, coarse: bool) -> tuple[str, str]:
        fine = r"^stage(\d)\.(?:dw_uses|pw_uses|dw_bns|pw_bns)\.(\d+)\."  # one group per reuse iteration
        return r"^stem\.", (r"^stage(\d)\." if coarse else fine)

    def _set_pool(self, global_pool: str) -> None:
        """The global pool is a function in :meth:`forward_head` (after the logits conv and its ReLU);
        ``self.pool`` is the max-pool between stages."""
        if global_pool not in self.pool_types:
            raise ConfigError(f"LruNet: global_pool must be 'avg' (the reference's 2x2 average pooling) or "
                              f"'', got {global_pool!r}")
        self.global_pool = global_pool

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.contiguous()  # dropout masks follow memory order: keep the reference's
        x = self.pre_logits(x)
        if pre_logits:
            return x
        out = F.relu(self.fc(x), inplace=True)  # the reference's ReLU on the logits
        if not self.global_pool:
            return out
        return F.avg_pool2d(out, 2, stride=1).flatten(1)  # flatten(1): a batch size no export bakes in

    def _prune_head(self) -> None:
        """The whole grouped head goes: ``pre_logits`` reads stage 4, which a pruned net may not have."""
        self.pre_logits = nn.Identity()
        self.reset_classifier(0, "")

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new logits conv ``256w -> num_classes`` (``0``: identity, the head then returns the
        ReLU'd, pooled ``256w`` features; ``global_pool=""``: unpooled maps)."""
        if global_pool is not None:
            self._set_pool(global_pool)
        self.num_classes = num_classes
        self.fc = nn.Conv2d(self.head_hidden_size, num_classes, 1) if num_classes else nn.Identity()


_KEY_RENAMES = ((r"^features\.", "stem."), (r"\.dw_bn_list\.", ".dw_bns."), (r"\.pw_bn_list\.", ".pw_bns."))


def config_from_state(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, int]:
    """``layer_reuse``, ``width_mult``, ``num_classes``, ``in_chans`` of a reference LruNet state_dict."""
    try:
        stem = state["features.0.weight"]
        dw = state["stage1.dw.weight"]
        logits = state["classifier.4.weight"]
    except KeyError as exc:
        raise CheckpointError(f"{source}: not an LruNet state_dict (no key {exc.args[0]!r})") from None
    reuse = len({k for k in state if re.match(r"stage1\.dw_bn_list\.\d+\.weight$", k)})
    if dw.shape[0] % 128 or reuse < 1:
        raise CheckpointError(
            f"{source}: stage1.dw.weight has shape {tuple(dw.shape)}; expected (128*w, 1, 3, 3)"
        )
    return {
        "layer_reuse": reuse,
        "width_mult": dw.shape[0] // 128,
        "num_classes": int(logits.shape[0]),
        "in_chans": int(stem.shape[1]),
    }


def _few(keys: list[str]) -> str:
    return str(keys[:5]) + (" ..." if len(keys) > 5 else "")


def checkpoint_filter_fn(
    state: dict[str, torch.Tensor], model: nn.Module, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The authors' state_dict (``features.``, ``dw_bn_list``, ``pw_bn_list``, ``dw``, ``classifier``)
    renamed to ours,
    keys and shapes checked against ``model`` (timm's ``checkpoint_filter_fn``)."""
    converted = {}
    for key, value in state.items():
        for pattern, repl in (*_KEY_RENAMES, *LruNet.legacy_keys):
            key = re.sub(pattern, repl, key)
        converted[key] = value
    ours = model.state_dict()
    for key, value in ours.items():  # checkpoints from PyTorch < 0.4.1 have no BN step counters
        if key.endswith("num_batches_tracked") and key not in converted:
            converted[key] = torch.zeros_like(value)
    missing = sorted(set(ours) - set(converted))
    unexpected = sorted(set(converted) - set(ours))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: keys do not match {type(model).__name__}: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}"
        )
    for key, value in ours.items():
        if converted[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(converted[key].shape)}, "
                f"the model expects {tuple(value.shape)}"
            )
    return converted


_VARIANTS = {"lrunet_1x": 1, "lrunet_2x": 2}  # name -> width_mult


def _build(variant: str, /, layer_reuse: int = 8, **kwargs: Any) -> LruNet:
    return LruNet(layer_reuse, _VARIANTS[variant], **kwargs)


def _create_lrunet(variant: str, pretrained: bool = False, **kwargs: Any) -> LruNet:
    """``N``-LruNet-``w``x (``layer_reuse=N``, default 8 as the reference code)."""
    return build_model_with_cfg(partial(_build, variant), variant, pretrained, **kwargs)


default_cfgs: dict[str, ModelInfo] = {
    name: ModelInfo(
        name, "lrunet", num_classes=10, paper=PAPER,
        table_row=f"SPEC 2.1: N-LruNet-{width}x (layer_reuse=N, default 8 as the reference code)",
        notes="CIFAR-10 by default; in_chans=1 for Fashion-MNIST (28x28); no input normalisation",
        extra={"width_mult": width}, first_conv="stem.0", classifier="fc",
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    )
    for name, width in _VARIANTS.items()
}


@register_model
def lrunet_1x(pretrained: bool = False, **kwargs: Any) -> LruNet:
    """``N``-LruNet-1x (``layer_reuse=N``)."""
    return _create_lrunet("lrunet_1x", pretrained, **kwargs)


@register_model
def lrunet_2x(pretrained: bool = False, **kwargs: Any) -> LruNet:
    """``N``-LruNet-2x (``layer_reuse=N``)."""
    return _create_lrunet("lrunet_2x", pretrained, **kwargs)


# The six checkpoints the authors released (their MANIFEST.json, under lrunet/ of the weights path):
# (model, dataset, layer_reuse, file, sha256, reported test accuracy %).
_CIFAR_NOTE = "published on the original test set; a JPEG re-encoded CIFAR-10 scores 4-5 points lower"
_RELEASE = "okankop/CNN-layer-reuse@1dd8d42bf58442c9530dd660fabe054d434008ed, folder pretrained/"
_RELEASED = (
    ("lrunet_1x", "cifar10", 1, "cifar10-lru1-ckpt-08391.t7",
     "6bac007ff78004d21884f7b0682f7978796f92a0e850cac6c1168ba756d81465", 83.91),
    ("lrunet_1x", "cifar10", 14, "cifar10-lru14-ckpt-08934.t7",
     "bc6991084834975d549134aa79cffaaf471a525649f2f0fa11151bdee9664bfe", 89.34),
    ("lrunet_2x", "cifar100", 1, "cifar100-lru1-2x-ckpt-06322.t7",
     "683a13b33520ac18d1fa2a9b74610cd9eba169c76f5ce11db89079fc0298dbe3", 63.22),
    ("lrunet_2x", "cifar100", 14, "cifar100-lru14-2x-ckpt-06884.t7",
     "62d4b4e9b8f3feff7ceb56c9ccf2f675615d3b369f38f8161f414f6b890a0da0", 68.84),
    ("lrunet_1x", "fashion_mnist", 1, "fashionmnist-lru1-ckpt-09117.t7",
     "f0b96bdedd6cf8027b4aaecf360ee8c32c7dd60d6224a603196850c306b7f58e", 91.17),
    ("lrunet_1x", "fashion_mnist", 10, "fashionmnist-lru10-ckpt-09346.t7",
     "aba6b4783ece6267aa761f6fff161b4cf651e005f92e6b3a842449aef1e2fe15", 93.46),
)
for _model, _dataset, _reuse, _file, _sha, _acc in _RELEASED:
    _tag = f"{_dataset}_n{_reuse}"
    # The release's evaluation (MANIFEST.json): pixels / 255; Fashion-MNIST grey at 28x28, CIFAR at 32x32.
    _chans, _side = (1, 28) if _dataset == "fashion_mnist" else (3, 32)
    register_pretrained(_model, PretrainedCfg(
        tag=_tag, file=f"lrunet/{_file}", sha256=_sha, source=_RELEASE,
        licence="MIT (Copyright (c) 2017 Okan Kopuklu)", dataset=_dataset, accuracy=_acc,
        command=f"dacnn eval --model {_model}.{_tag} --pretrained --dataset {_dataset}",
        model_kwargs={"layer_reuse": _reuse, "in_chans": _chans,
                      "num_classes": 100 if _dataset == "cifar100" else 10},
        normalize=False, pad_to=None, input_size=(_chans, _side, _side), filter_fn=checkpoint_filter_fn,
        notes="" if _dataset == "fashion_mnist" else _CIFAR_NOTE,
    ))
