"""Evaluate saved weights of any kind on a dataset split: what ``dacnn eval`` runs.

Anything :func:`dacnn.export.resolve.load_source` accepts (a run, a training state, a weights file, a
compact export of any dtype, a released checkpoint, a pretrained name)::

    result, meta = evaluate_checkpoint("lrunet_1x.fashion_mnist_n10")   # published: 93.46 %
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dacnn.counting import count_params
from dacnn.export.resolve import load_source, resolve_weights, test_loader
from dacnn.train.builders import resolve_device
from dacnn.train.engine import EvalResult, evaluate

__all__ = ["resolve_weights", "evaluate_checkpoint"]


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
) -> tuple[EvalResult, dict[str, Any]]:
    """Top-1 accuracy and loss of saved weights on a dataset split; returns ``(result, meta)``.

    Preprocessing follows the weights' description: ``normalize`` (default true) and ``pad_to``
    (absent: pad to the model's input size when images are smaller; ``null``: no padding); ``tta`` (the
    run's test-time augmentation level, default 0) is applied as the run measured its test accuracy.
    """
    dev = resolve_device(device)
    model, meta = load_source(target, which=which, device=dev, weights_dir=weights_dir)
    loader = test_loader(meta, dataset=dataset, split=split, data_dir=data_dir, batch_size=batch_size,
                         device=dev)
    meta = {**meta, "weights": meta["source"], "dataset": dataset or meta["dataset"], "split": split,
            "unique_params": count_params(model).unique}
    with torch.inference_mode():
        return evaluate(model, loader, dev, tta=int(meta.get("tta") or 0)), meta
