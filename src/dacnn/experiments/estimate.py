"""Estimate how long the rows of a spec take at a scale, by timing a few training steps of each model.

``dacnn reproduce table2 --scale cpu --estimate``: for every row still to run, a couple of training
steps and one evaluation batch of its model are timed on random input of the right shape, and the
images the protocol trains and evaluates on are divided by those speeds. The time is this process's
CPU time (``time.process_time``), so the estimate is in CPU-seconds of one thread and does not grow
when other jobs load the machine (a loaded machine stretches the wall time, not the CPU time); with
``--threads 1`` it is the time of one single-threaded run. Data loading and checkpoints are not
counted (small next to the convolutions on a CPU).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from dacnn.data import DATASETS
from dacnn.train.builders import build_model, build_optimizer, dataset_info, model_input_hw, model_kwargs
from dacnn.train.config import config_from_dict

__all__ = ["measure_speed", "estimate_row"]

_speeds: dict[str, tuple[float, float]] = {}
ROW_OVERHEAD_S = 5.0  # loading the data, building loaders, the test subset and FLOP count (measured ~4-6 s)


def measure_speed(cfg: Any, steps: int = 2, batch: int = 128) -> tuple[float, float]:
    """``(train images/s, eval images/s)`` per CPU-second of ``cfg``'s model with its optimizer."""

    info = dataset_info(cfg.dataset)
    kwargs = model_kwargs(cfg, info.num_classes, info.image_size[2])
    key = repr((cfg.model, sorted(kwargs.items()), cfg.optimizer, cfg.pad_to, batch))
    if key in _speeds:
        return _speeds[key]
    side = info.input_size(info.pad_for(model_input_hw(cfg.model), cfg.pad_to))[1]
    model = build_model(cfg.model, kwargs)
    optimizer = build_optimizer(model, cfg)
    batch = min(batch, cfg.batch_size)
    x = torch.randn(batch, info.image_size[2], side, side)
    y = torch.randint(0, info.num_classes, (batch,))
    model.train()
    timed = 0.0
    for i in range(steps + 1):
        tick = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if i:
            timed += time.process_time() - tick
    train_speed = batch * steps / timed
    model.eval()
    with torch.no_grad():
        model(x)
        tick = time.process_time()
        model(x)
        eval_speed = batch / max(time.process_time() - tick, 1e-6)
    _speeds[key] = (train_speed, eval_speed)
    return train_speed, eval_speed


def _images(cfg: Any, test_subset: int | None) -> tuple[int, int, int]:

    splits = DATASETS[cfg.dataset].splits
    train = splits["train"] - cfg.val_size
    if cfg.train_subset is not None:
        train = min(train, cfg.train_subset)
    test = splits["test"] if test_subset is None else min(test_subset, splits["test"])
    return train, cfg.val_size, test


def estimate_row(planned: Any, source_cfg: Any | None = None) -> tuple[float, str]:
    """``(seconds, explanation)`` for one planned row (see the module docstring)."""

    row = planned.row
    if row.kind == "prune":
        if source_cfg is None:
            return 0.0, "needs its source row"
        train_speed, eval_speed = measure_speed(source_cfg)
        n_train, _, _ = _images(source_cfg, None)
        epochs = int(planned.runner.get("epochs", 0))
        n_train = planned.runner.get("train_subset") or n_train
        test = planned.resolved.test_subset or 10000
        seconds = ROW_OVERHEAD_S + epochs * n_train / train_speed + 3 * test / eval_speed
        return seconds, f"{epochs} x {n_train} fine-tuning images at {train_speed:.0f} img/s"
    cfg = config_from_dict(planned.train)
    train_speed, eval_speed = measure_speed(cfg)
    n_train, n_val, n_test = _images(cfg, planned.resolved.test_subset)
    seconds = ROW_OVERHEAD_S + cfg.epochs * n_train / train_speed + (cfg.epochs * n_val + n_test) / eval_speed
    if row.kind == "filters":
        steps = int(planned.resolved.filters.get("steps", 200))
        seconds += 5 * steps * int(planned.resolved.filters.get("filters", 5)) / train_speed
    return seconds, (f"{cfg.epochs} x {n_train} images at {train_speed:.0f} img/s, "
                     f"{cfg.epochs * n_val + n_test} eval images at {eval_speed:.0f} img/s")
