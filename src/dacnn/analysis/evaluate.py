"""Evaluate saved weights of any kind on a dataset split: what ``dacnn eval`` runs.

Anything :func:`dacnn.loading.load_source` accepts (a run, a training state, a weights file, a
compact export of any dtype, a released checkpoint, a pretrained name)::

    result, meta = evaluate_checkpoint("lrunet_1x.fashion_mnist_n10")   # published: 93.46 %

:func:`test_loader` feeds a split as the weights were trained (normalisation, padding) and
:func:`test_accuracy` measures a model on it with the run's test-time augmentation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dacnn.counting import count_params
from dacnn.data import DATASETS, DeviceLoader, load_dataset
from dacnn.errors import ConfigError
from dacnn.loading import load_source
from dacnn.registry import model_info
from dacnn.train.builders import resolve_device
from dacnn.train.engine import EvalResult, evaluate

__all__ = ["evaluate_checkpoint", "test_loader", "test_accuracy"]


def evaluate_checkpoint(
    target: str | Path,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    batch_size: int = 500,
    device: str = "auto",
    which: str = "best",
    weights_dir: str | Path | None = None,
    tta: int | None = None,
) -> tuple[EvalResult, dict[str, Any]]:
    """Top-1 accuracy and loss of saved weights on a dataset split; returns ``(result, meta)``.

    Preprocessing follows the weights' description: ``normalize`` (default true) and ``pad_to``
    (absent: pad to the model's input size when images are smaller; ``null``: no padding); ``tta`` (the
    run's test-time augmentation level, default 0) is applied as the run measured its test accuracy,
    unless ``tta`` is given.
    """
    dev = resolve_device(device)
    model, meta = load_source(target, which=which, device=dev, weights_dir=weights_dir)
    loader = test_loader(meta, dataset=dataset, split=split, data_dir=data_dir, batch_size=batch_size,
                         device=dev)
    meta = {**meta, "weights": meta["source"], "dataset": dataset or meta["dataset"], "split": split,
            "unique_params": count_params(model).unique}
    with torch.inference_mode():
        level = int(meta.get("tta") or 0) if tta is None else tta
        return evaluate(model, loader, dev, tta=level), {**meta, "tta": level}


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
        pad_to = info.pad_for(model_info(meta["model"]).input_size[1] if meta.get("model") else None)
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
