"""One resolver from what a user types to a model with its weights (``eval``, ``export``, ``prune``).

:func:`load_source` accepts

* a pretrained name ``<model>.<tag>`` (:func:`dacnn.list_pretrained`), loaded from the weights
  directory (:mod:`dacnn.hub`);
* a run directory ``runs/<name>/`` (or its ``checkpoints/`` folder, or a run name under ``out_dir``):
  the weights the ``best`` pointer names (else ``last``; ``which="last"`` reverses that), the
  evaluation weights (EMA) when the run kept them;
* a training state ``*.state.pt`` (its evaluation weights);
* a weights file ``*.safetensors`` with its JSON sidecar (training checkpoints and weights written by
  ``dacnn import-weights``): :func:`dacnn.checkpoint.load_model_file`;
* a compact export of any dtype, fp32, fp16 or int8 (:func:`dacnn.export.compact.load_exported`);
* a released LruNet checkpoint ``*.t7`` (:func:`dacnn.export.import_weights.import_lrunet`).

``meta`` describes the weights: ``model``, ``model_kwargs``, ``source`` and, when known,
``dataset``, ``normalize`` and ``pad_to``; :func:`test_loader` feeds a split as the model was trained
(``pad_to`` absent: pad to the model's input size when the images are smaller).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dacnn import checkpoint as ckpt
from dacnn.data import DATASETS, DeviceLoader, load_dataset
from dacnn.errors import CheckpointError, ConfigError
from dacnn.export.compact import is_compact_export, load_exported
from dacnn.export.import_weights import import_lrunet
from dacnn.registry import create_model, list_pretrained, model_info, pretrained_cfg, split_tag
from dacnn.train.engine import evaluate

__all__ = ["is_pretrained_name", "pretrained_meta", "resolve_weights", "load_source", "test_loader",
           "test_accuracy"]

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


def test_loader(
    meta: dict[str, Any],
    *,
    dataset: str | None = None,
    split: str = "test",
    data_dir: str | None = None,
    limit: int | None = None,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
) -> DeviceLoader:
    """A :class:`dacnn.data.DeviceLoader` over ``split`` of ``dataset`` (default ``meta['dataset']``;
    first ``limit`` images of a seeded permutation), normalised and padded as the model was trained."""
    name = dataset or meta.get("dataset")
    if not name:
        raise ConfigError(f"{meta.get('source', 'checkpoint')}: no dataset recorded; pass --dataset")
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}: choose one of {', '.join(sorted(DATASETS))}")
    info = DATASETS[name]
    expected = meta.get("model_kwargs", {}).get("num_classes")
    if expected is None and meta.get("model"):
        expected = model_info(meta["model"]).num_classes
    if expected is not None and expected != info.num_classes:
        raise ConfigError(
            f"{meta.get('source')} predicts {expected} classes but {name} has {info.num_classes}"
        )
    chans = meta.get("model_kwargs", {}).get("in_chans")
    if chans is None and meta.get("model"):
        chans = model_info(meta["model"]).input_size[0]
    if chans is not None and chans != info.image_size[2]:
        raise ConfigError(
            f"{meta.get('source')} takes {chans}-channel images but {name} has {info.image_size[2]}-channel "
            "images: pass the --dataset it was trained on"
        )
    if "pad_to" in meta:
        pad_to = meta["pad_to"]
    else:
        hw = model_info(meta["model"]).input_size[1] if meta.get("model") else None
        pad_to = hw if hw and hw > info.image_size[0] else None
    data = load_dataset(name, split, data_dir=data_dir)
    if limit is not None and limit < len(data):
        data = data.subset(limit, seed=0)
    return DeviceLoader(data, batch_size=batch_size, shuffle=False, drop_last=False, seed=0, device=device,
                        augment=None, normalize=bool(meta.get("normalize", True)), pad_to=pad_to)


def test_accuracy(model: nn.Module, loader: DeviceLoader, tta: int = 0) -> float:
    """Top-1 accuracy (%) of ``model`` on ``loader`` (the training engine's evaluation), with test-time
    augmentation level ``tta`` (the run's ``TrainConfig.tta``, recorded as ``meta["tta"]``)."""
    device = next(iter(model.parameters())).device
    with torch.inference_mode():
        return evaluate(model, loader, device, tta=tta).acc
