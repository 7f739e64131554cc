"""One training step and one evaluation pass: the two pieces of arithmetic the loop repeats.

Kept free of files and logging so ``benchmarks/train_throughput.py`` times exactly what ``dacnn
train`` runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dacnn.train.distributed import DistContext, all_reduce_sum, shard_batch
from dacnn.train.inference import fold_batchnorm

__all__ = ["StepRunner", "evaluate", "autocast_context", "EvalResult", "tta_logits"]


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on GPU; on CPU only bf16 applies (AMX/AVX-512 bf16), fp16 is ignored."""
    if amp == "none" or (device.type != "cuda" and amp != "bf16"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class StepRunner:
    """One optimisation step: :meth:`forward_backward` (loss, gradients) then :meth:`apply` (clip, step).

    The two halves are separate so the loop can check the loss for nan/inf before the weights
    change; :meth:`step` runs both. Returned tensors stay on the device (no synchronisation).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        *,
        amp: str = "none",
        label_smoothing: float = 0.0,
        clip_grad: float | None = None,
        channels_last: bool = False,
    ) -> None:
        self.model, self.optimizer, self.device = model, optimizer, device
        self.amp, self.label_smoothing, self.clip_grad = amp, label_smoothing, clip_grad
        self.channels_last = channels_last
        use_scaler = amp == "fp16" and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and gradients of one batch; the weights are not changed yet.

        ``y`` holds class indices, or (B, K) soft targets (mixup/CutMix): then the loss is timm's
        ``SoftTargetCrossEntropy`` and "correct" counts the dominant target."""
        x = self.prepare(x)
        soft = y.is_floating_point()  # mixup/CutMix soft targets, label smoothing already in them
        with autocast_context(self.device, self.amp):
            logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=0.0 if soft else self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        correct = (logits.detach().argmax(1) == (y.argmax(1) if soft else y)).sum()
        return loss.detach(), correct

    def apply(self) -> None:
        """Clip (optionally) and take the optimizer step with the gradients just computed."""
        if self.clip_grad is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            nn.utils.clip_grad_norm_(params, self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, correct = self.forward_backward(x, y)
        self.apply()
        return loss, correct


def tta_logits(net: nn.Module, x: torch.Tensor, level: int = 0) -> torch.Tensor:
    """Logits averaged over test-time views (airbench's ``infer``): 0 the image, 1 its mirror too,
    2 also both of them shifted by one pixel up-left and down-right (reflect padding): six views,
    the untranslated pair weighted 1/2, each shifted pair 1/4."""
    if level == 0:
        return net(x)
    mirrored = 0.5 * net(x) + 0.5 * net(x.flip(-1))
    if level == 1:
        return mirrored
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[..., :h, :w], padded[..., 2:h + 2, 2:w + 2]]
    return 0.5 * mirrored + 0.25 * sum(0.5 * net(v) + 0.5 * net(v.flip(-1)) for v in shifted)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    acc: float  # percent
    n: int


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    ctx: DistContext | None = None,
    amp: str = "none",
    channels_last: bool = False,
    fold_bn: bool = True,
    tta: int = 0,
) -> EvalResult:
    """Cross-entropy and top-1 accuracy (%) over a loader; with DDP each rank takes its slice and
    the sums are all-reduced, so every rank gets the full-set figures.

    Runs under ``torch.inference_mode`` on a copy with BatchNorm folded into the convs
    (:func:`~dacnn.train.inference.fold_batchnorm`; ``fold_bn=False`` or a compiled model: as is);
    ``tta`` averages the logits of test-time views (:func:`tta_logits`).
    """
    ctx = ctx or DistContext()
    was_training = model.training
    net = fold_batchnorm(model) if fold_bn and not hasattr(model, "_orig_mod") else model
    net.eval()
    n = 0
    try:
        with torch.inference_mode():
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            for x, y in loader:
                x, y = shard_batch(x, y, ctx)
                if y.numel() == 0:
                    continue
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast_context(device, amp):
                    logits = tta_logits(net, x, tta).float()
                loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
                correct += (logits.argmax(1) == y).sum()
                n += y.numel()
    finally:
        model.train(was_training)
    total_loss, total_correct, total_n = all_reduce_sum([loss_sum.item(), float(correct.item()), float(n)],
                                                        ctx, device)
    if total_n == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    return EvalResult(total_loss / total_n, 100.0 * total_correct / total_n, int(total_n))
