"""What ``dacnn export``/``prune`` read: a run directory, a weights file or a compact export.

* a run directory ``runs/<name>/`` (or its ``checkpoints/`` folder): the weights the ``best``
  pointer names (else ``last``), evaluation weights (EMA) when the run kept them;
* a training weights file ``*.safetensors`` with its JSON sidecar (also imported released weights):
  :func:`dacnn.train.checkpoint.load_model_file`;
* a compact export (:mod:`dacnn.export.compact`): :func:`~dacnn.export.compact.load_exported`.

``meta`` is the sidecar's description: ``model``, ``model_kwargs`` and, when known, ``dataset``,
``normalize`` and ``pad_to`` (what :func:`test_accuracy` needs to feed the test set as in training).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dacnn.errors import CheckpointError, ConfigError
from dacnn.export.compact import is_compact_export, load_exported

__all__ = ["weights_path", "load_source", "test_loader", "test_accuracy"]


def weights_path(source: str | os.PathLike[str]) -> Path:
    """The weights file ``source`` designates (a run, a checkpoints folder or a file)."""
    from dacnn.checkpoint import read_pointer

    path = Path(source)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint file")
    for ckpt_dir in (path / "checkpoints", path):
        for which in ("best", "last"):
            if (ckpt_dir / f"{which}.json").is_file():
                pointer = read_pointer(ckpt_dir, which)
                name = pointer.get("eval_weights") or pointer.get("weights")
                if not name:
                    raise CheckpointError(f"{ckpt_dir / which}.json names no weights file")
                return ckpt_dir / name
    raise CheckpointError(f"{path}: no checkpoints/best.json or last.json (is it a run directory?)")


def load_source(source: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """``(float32 eval-mode model, meta)`` from a run, a weights file or a compact export."""
    path = weights_path(source)
    if is_compact_export(path):
        model, header = load_exported(path)
        meta = {**header.meta, "model": header.model, "model_kwargs": header.model_kwargs}
    else:
        from dacnn.checkpoint import load_model_file

        model, meta = load_model_file(path)
        model.create_kwargs = dict(meta.get("model_kwargs", {}))
    meta = {**meta, "source": str(path)}
    return model.float().eval(), meta


def test_loader(
    meta: dict[str, Any], *, data_dir: str | None = None, limit: int | None = None, batch_size: int = 500
) -> Any:
    """A :class:`dacnn.data.DeviceLoader` over the test split of ``meta['dataset']`` (first ``limit``
    images of a seeded permutation), normalised and padded as the model was trained."""
    from dacnn.data import DeviceLoader, load_dataset

    dataset = meta.get("dataset")
    if not dataset:
        raise ConfigError(f"{meta.get('source', 'checkpoint')}: no dataset recorded; cannot evaluate")
    split = load_dataset(dataset, "test", data_dir=data_dir)
    if limit is not None and limit < len(split):
        split = split.subset(limit, seed=0)
    return DeviceLoader(
        split,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        seed=0,
        augment=None,
        normalize=meta.get("normalize", True),
        pad_to=meta.get("pad_to"),
    )


def test_accuracy(model: nn.Module, loader: Any) -> float:
    """Top-1 test accuracy (%) of ``model`` on ``loader`` (the training engine's evaluation)."""
    from dacnn.train.engine import evaluate

    return evaluate(model, loader, torch.device("cpu")).acc
