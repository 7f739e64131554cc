"""Loading: one resolver from what a user types to a model with its weights (``eval``, ``export``,
``prune``, ``publish``, the experiments).

:func:`load_source` accepts

* a pretrained name ``<model>.<tag>`` (:func:`dacnn.list_pretrained`), loaded from the weights
  directory (:mod:`dacnn.hub`);
* a run directory ``runs/<name>/`` (or its ``checkpoints/`` folder, or a run name under ``out_dir``):
  the weights the ``best`` pointer names (else ``last``; ``which="last"`` reverses that), the
  evaluation weights (EMA) when the run kept them;
* a training state ``*.state.pt`` (its evaluation weights);
* a weights file ``*.safetensors`` with its JSON sidecar (training checkpoints and weights written by
  ``dacnn import-weights``): :func:`dacnn.checkpoint.load_model_file`;
* a compact export of any dtype, fp32, fp16 or int8 (:func:`dacnn.compact_format.load_exported`);
* a released LruNet checkpoint ``*.t7`` (:func:`dacnn.importing.import_lrunet`).

``meta`` describes the weights: ``model``, ``model_kwargs``, ``source`` and, when known,
``dataset``, ``normalize``, ``pad_to`` and ``tta``; :func:`dacnn.analysis.evaluate.test_loader` feeds
a split as the model was trained (``pad_to`` absent: pad to the model's input size when the images
are smaller).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dacnn import checkpoint as ckpt
from dacnn.compact_format import is_compact_export, load_exported
from dacnn.errors import CheckpointError
from dacnn.importing import import_lrunet
from dacnn.registry import create_model, list_pretrained, pretrained_cfg, split_tag

__all__ = ["is_pretrained_name", "pretrained_meta", "resolve_weights", "load_source"]

Source = str | os.PathLike[str]


def is_pretrained_name(source: Source) -> bool:
    """Whether ``source`` is a registered ``<model>.<tag>`` (and not an existing path)."""
    text = os.fspath(source)
    return not Path(text).exists() and text in list_pretrained()


def resolve_weights(source: Source, which: str = "best", out_dir: str | Path = "runs") -> Path:
    """The weights file a run directory / checkpoints folder / state file / weights file names."""
    path = Path(source)
    if not path.exists() and not path.is_absolute() and (Path(out_dir) / path).exists():
        path = Path(out_dir) / path
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {os.fspath(source)!r} does not exist (a run directory, .safetensors, .state.pt or "
            f".t7 file, or a pretrained name from `dacnn models --pretrained`; runs are also looked for "
            f"under {out_dir}/)"
        )
    if path.is_dir():
        newest = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        if which == "last" and ckpt.list_versions(newest):  # a damaged newest version falls back
            pointer, _, note = ckpt.newest_valid(newest, "last")
            if note:
                print(f"warning: {note}", file=sys.stderr)
            return newest / (pointer.get("eval_weights") or pointer["weights"])
        order = [which] + [w for w in ("best", "last") if w != which]
        for ckpt_dir in (path / "checkpoints", path):
            for name in order:
                if (ckpt_dir / f"{name}.json").is_file():
                    pointer = ckpt.read_pointer(ckpt_dir, name)
                    weights = pointer.get("eval_weights") or pointer.get("weights")
                    if not weights:
                        raise CheckpointError(f"{ckpt_dir / name}.json names no weights file")
                    return ckpt_dir / weights
        raise CheckpointError(f"{path}: no checkpoints/best.json or last.json (is it a run directory?)")
    if path.name.endswith(".state.pt"):
        state = ckpt.load_state(path)
        return path.parent / (state.get("ema_weights") or state["weights"])
    return path


def pretrained_meta(name: str) -> dict[str, Any]:
    """The ``meta`` of pretrained weights ``name`` (as :func:`load_source` gives it), without the file."""
    cfg = pretrained_cfg(name)
    return {"model": split_tag(name)[0], "model_kwargs": dict(cfg.model_kwargs), "dataset": cfg.dataset,
            "normalize": cfg.normalize, "pad_to": cfg.pad_to, "tta": cfg.tta, "pretrained": name,
            "published_accuracy": cfg.accuracy, "source": name}


def _pretrained(name: str, weights_dir: str | Path | None) -> tuple[nn.Module, dict[str, Any]]:
    return create_model(name, pretrained=True, weights_dir=weights_dir), pretrained_meta(name)


def load_source(
    source: Source,
    *,
    which: str = "best",
    device: str | torch.device = "cpu",
    out_dir: str | Path = "runs",
    weights_dir: str | Path | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``(float32 eval-mode model on device, meta)`` from anything listed in the module docstring."""
    if is_pretrained_name(source):
        model, meta = _pretrained(os.fspath(source), weights_dir)
    else:
        path = resolve_weights(source, which, out_dir)
        if path.suffix == ".t7":
            model, meta = import_lrunet(path)
        elif path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path}: expected a run directory, a .safetensors, .state.pt or .t7 file, a pretrained name"
            )
        elif is_compact_export(path):
            model, header = load_exported(path)
            meta = {**header.meta, "model": header.model, "model_kwargs": header.model_kwargs}
        else:
            model, meta = ckpt.load_model_file(path)
        meta = {**meta, "source": str(path)}
    return model.float().to(device).eval(), meta
