"""Magnitude pruning baseline (Han et al., arXiv 1506.02626), for DACNN Table 8.

DACNN compares sharing with pruning at equal compression. Here the weights of convolutions and
linear layers (every floating tensor of 2 or more dimensions; a shared kernel once) with the
smallest magnitudes are set to zero:

* ``scope="global"``: one threshold over all those weights together (Han et al.'s setting);
* ``scope="layer"``: the same fraction removed from each tensor.

Masks stay fixed while fine-tuning: :func:`keep_masks` re-applies them after every optimizer step
(``Optimizer.register_step_post_hook``), so any training loop keeps pruned weights at zero;
:func:`prune_run` fine-tunes with :func:`dacnn.train.train` itself. Vectors
(BatchNorm affine, biases) are never pruned. :func:`count_nonzero` counts unique parameters.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dacnn import checkpoint as ckpt
from dacnn.analysis.evaluate import test_accuracy, test_loader
from dacnn.counting import parameter_uses
from dacnn.errors import ConfigError
from dacnn.loading import load_source
from dacnn.train.config import config_from_dict, dump_yaml, load_yaml
from dacnn.train.loop import train

__all__ = [
    "SCOPES",
    "prunable_weights",
    "magnitude_prune",
    "apply_masks",
    "keep_masks",
    "count_nonzero",
    "prune_run",
]

SCOPES = ("global", "layer")


def prunable_weights(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Conv and linear weights (floating parameters with 2+ dims), each tensor once."""
    for name, param in model.named_parameters():  # deduplicated: a shared kernel appears once
        if param.is_floating_point() and param.dim() >= 2:
            yield name, param


def _smallest_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean keep-mask of ``magnitudes`` (flat) with the ``k`` smallest entries removed."""
    keep = torch.ones_like(magnitudes, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(magnitudes, k, largest=False).indices] = False
    return keep


def check_prune_args(ratio: float, scope: str) -> None:
    """``0 <= ratio < 1`` and a known scope, else :class:`ConfigError`."""
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"prune ratio must be in [0, 1), got {ratio}")
    if scope not in SCOPES:
        raise ConfigError(f"prune scope must be one of {', '.join(SCOPES)}, got {scope!r}")


@torch.no_grad()
def magnitude_prune(model: nn.Module, ratio: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Zero the fraction ``ratio`` of smallest-magnitude prunable weights; return keep-masks by name.

    ``ratio`` is the fraction of the prunable weights removed (0 <= ratio < 1); ties at the
    threshold are broken by position so exactly ``round(ratio * n)`` weights go.
    """
    check_prune_args(ratio, scope)
    weights = dict(prunable_weights(model))
    if not weights:
        raise ConfigError(f"{type(model).__name__} has no conv/linear weights to prune")
    masks: dict[str, torch.Tensor] = {}
    if scope == "global":
        flat = torch.cat([w.detach().abs().flatten().float() for w in weights.values()])
        keep = _smallest_mask(flat, round(ratio * flat.numel()))
        for (name, w), part in zip(weights.items(), torch.split(keep, [w.numel() for w in weights.values()])):
            masks[name] = part.view_as(w)
    else:
        for name, w in weights.items():
            masks[name] = _smallest_mask(
                w.detach().abs().flatten().float(), round(ratio * w.numel())
            ).view_as(w)
    apply_masks(model, masks)
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Set every masked-out weight of ``model`` to zero (in place)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device, params[name].dtype))


def keep_masks(
    optimizer: torch.optim.Optimizer, model: nn.Module, masks: dict[str, torch.Tensor]
) -> torch.utils.hooks.RemovableHandle:
    """Re-apply ``masks`` after each ``optimizer.step()`` (momentum and weight decay cannot revive
    pruned weights). Returns the hook handle; ``.remove()`` ends it."""
    return optimizer.register_step_post_hook(lambda *_: apply_masks(model, masks))


def count_nonzero(model: nn.Module, prunable_only: bool = False) -> tuple[int, int]:
    """``(non-zero, total)`` over the unique parameters of :func:`dacnn.count_params` (or only the
    prunable weights)."""
    params = (p for _, p in prunable_weights(model)) if prunable_only else (
        p for _, p, _ in parameter_uses(model).values())
    nonzero = total = 0
    for p in params:
        nonzero += int(torch.count_nonzero(p.detach()))
        total += p.numel()
    return nonzero, total


# ---------------------------------------------------------------- `dacnn prune RUN`: prune, fine-tune, report


def _run_dir_of(source: str | os.PathLike[str]) -> Path | None:
    path = Path(source)
    for candidate in (path, path.parent.parent if path.is_file() else path.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None


def _finetune_config(source: str | os.PathLike[str], meta: dict[str, Any], **overrides: Any) -> Any:
    """The run's ``config.yaml`` (or the sidecar's model/dataset) with the fine-tuning overrides."""
    run_dir = _run_dir_of(source)
    if run_dir is not None:
        base = load_yaml(run_dir / "config.yaml")
    else:
        base = {
            "model": meta["model"],
            "dataset": meta.get("dataset"),
            "normalize": meta.get("normalize", True),
            "pad_to": meta.get("pad_to"),
        }
    base["model_kwargs"] = {**base.get("model_kwargs", {}), **meta.get("model_kwargs", {})}
    lr = overrides.pop("lr", None) or base.get("lr", 0.1) / 10
    settings = {
        **base,
        "lr": lr,
        "lr_schedule": "cosine",
        "lr_milestones": [],
        "warmup_epochs": 0.0,
        "min_lr": 0.0,
        "ema": None,
        "lookahead": False,
        "whiten": False,  # the first conv keeps its trained (whitening) weights
        "compile": False,
        "eval_test": False,
        "recipe": None,
        **{k: v for k, v in overrides.items() if v is not None},
    }
    return config_from_dict(settings, source=f"{run_dir or source}: fine-tuning config")


def _select_last(ckpt_dir: Path) -> None:
    """Point ``best`` at ``last`` (fine-tuning selects nothing) and delete the other versions."""
    last = ckpt.read_pointer(ckpt_dir, "last")
    ckpt.atomic_write_text(ckpt_dir / "best.json", json.dumps(last, indent=1) + "\n")
    for path in ckpt_dir.glob("e*-s*"):
        if path.name.split(".")[0].removesuffix("-ema") != last["version"]:
            path.unlink(missing_ok=True)


def prune_run(
    source: str | os.PathLike[str],
    *,
    ratio: float,
    epochs: int = 0,
    scope: str = "global",
    lr: float | None = None,
    train_subset: int | None = None,
    limit: int | None = None,
    data_dir: str | None = None,
    output: str | os.PathLike[str] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """``dacnn prune``: load a run's model, prune, fine-tune ``epochs``, test, save a run directory.

    Fine-tuning is :func:`dacnn.train.train` started from the pruned weights (so it has AMP,
    checkpoints, resume, the NaN guard and DDP) with the masks re-applied after every optimizer
    step; it uses the run's recipe with a tenth of its learning rate (cosine to zero) unless ``lr`` is
    given, no EMA, and the last epoch is tested. The output directory holds ``config.yaml``,
    ``checkpoints/`` (readable by ``dacnn export``) and ``prune.json``.
    """
    check_prune_args(ratio, scope)
    model, meta = load_source(source)
    run_dir = _run_dir_of(source)
    default = f"{(run_dir or Path(meta['source']).with_suffix('')).as_posix().rstrip('/')}-pruned{ratio:g}"
    out = Path(output or default)
    cfg = _finetune_config(
        source, meta, lr=lr, epochs=max(epochs, 1), train_subset=train_subset, data_dir=data_dir,
        out_dir=str(out.parent), run_name=out.name,
    )
    loader = test_loader(meta, data_dir=data_dir, limit=limit)
    tta = int(meta.get("tta", 0))  # evaluated as the source run was
    before = test_accuracy(model, loader, tta)
    masks = magnitude_prune(model, ratio, scope)
    pruned = test_accuracy(model, loader, tta)
    kept, prunable = count_nonzero(model, prunable_only=True)
    pruned_meta = {"pruned": {"ratio": ratio, "scope": scope, "prunable_kept": kept}}
    history: list[dict[str, Any]] = []
    finetune_cpu = None
    if epochs > 0:
        with tempfile.TemporaryDirectory() as tmp:
            init = ckpt.save_weights(model, Path(tmp) / "pruned.safetensors", {"model": meta["model"]})
            trained = train(cfg, init_weights=init, meta=pruned_meta, verbose=verbose,
                            on_optimizer=lambda m, opt: keep_masks(opt, m, masks))
        out = Path(trained.run_dir or out)
        _select_last(out / "checkpoints")
        history = [{"epoch": r["epoch"], "val_acc": r["val_acc"]} for r in trained.history]
        finetune_cpu = trained.cpu_time
        model, _ = load_source(out)
        after = test_accuracy(model, loader, tta)
    else:
        after = pruned
        out.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        sidecar = {k: v for k, v in meta.items() if k not in ("source", "format", "ema")}
        state = {"epoch": 0, "batches_done": 0, "global_step": 0, "epoch_done": True,
                 "config": cfg.to_dict(), "pruned": {"ratio": ratio, "scope": scope, "epochs": 0}}
        ckpt.save_checkpoint(out / "checkpoints", model=model.cpu(), ema_model=None, state=state,
                             meta={**sidecar, **pruned_meta}, is_best=True)
    nonzero, unique = count_nonzero(model)
    kept, prunable = count_nonzero(model, prunable_only=True)
    result = {
        "source": meta["source"],
        "model": meta["model"],
        "dataset": meta.get("dataset"),
        "ratio": ratio,
        "scope": scope,
        "epochs": epochs,
        "lr": cfg.lr if epochs else None,
        "test_images": limit,
        "acc_before": before,
        "acc_pruned": pruned,
        "acc_after": after,
        "acc_drop": before - after,
        "nonzero_params": nonzero,
        "unique_params": unique,
        "prunable_kept": kept,
        "prunable_total": prunable,
        "compression": unique / max(nonzero, 1),
        "history": history,
        "finetune_cpu_time": finetune_cpu,
        "output": str(out),
    }
    ckpt.atomic_write_text(out / "prune.json", json.dumps(result, indent=1) + "\n")
    return result
