"""Evaluate a saved model: a run directory, a training state or a ``.safetensors`` file with sidecar.

What ``dacnn eval`` runs; also the API for checking imported weights::

    result, meta = evaluate_checkpoint("weights/fashionmnist-lru1.safetensors", data_dir="../shared/data")
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from dacnn import checkpoint as ckpt
from dacnn.counting import count_params
from dacnn.errors import CheckpointError, ConfigError
from dacnn.train.builders import dataset_info, model_input_hw, resolve_device
from dacnn.train.engine import EvalResult, evaluate

__all__ = ["resolve_weights", "evaluate_checkpoint"]


def resolve_weights(target: str | Path, which: str = "best", out_dir: str | Path = "runs") -> Path:
    """The weights file a run directory / checkpoint directory / state file / weights file names.

    For a run the ``best`` pointer is used (falling back to ``last``), and its evaluation weights
    (the EMA when the run kept one). ``which="last"`` takes the newest intact version when the one
    ``last`` names is damaged, and says so on stderr.
    """
    path = Path(target)
    if not path.exists() and not path.is_absolute() and (Path(out_dir) / path).exists():
        path = Path(out_dir) / path
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(target)!r} does not exist (a run directory, .safetensors "
                              f"or .state.pt file; runs are also looked for under {out_dir}/)")
    if path.is_dir():
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        if which == "last" and ckpt.list_versions(ckpt_dir):
            pointer, _, note = ckpt.newest_valid(ckpt_dir, "last")
            if note:
                print(f"warning: {note}", file=sys.stderr)
            return ckpt_dir / pointer["eval_weights"]
        order = [which] + [w for w in ("best", "last") if w != which]
        for name in order:
            if (ckpt_dir / f"{name}.json").is_file():
                return ckpt_dir / ckpt.read_pointer(ckpt_dir, name)["eval_weights"]
        raise CheckpointError(f"{path} holds no checkpoint (no best.json or last.json)")
    if path.name.endswith(".state.pt"):
        state = ckpt.load_state(path)
        return path.parent / (state.get("ema_weights") or state["weights"])
    if path.suffix == ".safetensors":
        return path
    raise CheckpointError(f"{path}: expected a run directory, a .safetensors or a .state.pt file")


def evaluate_checkpoint(
    target: str | Path,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    batch_size: int = 500,
    device: str = "auto",
    which: str = "best",
) -> tuple[EvalResult, dict[str, Any]]:
    """Top-1 accuracy and loss of a saved model on a dataset split; returns ``(result, meta)``.

    Preprocessing follows the sidecar: ``normalize`` (default true) and ``pad_to`` (absent: pad to
    the model's input size when images are smaller; ``null``: no padding).
    """
    from dacnn.data import DeviceLoader, load_dataset

    weights = resolve_weights(target, which)
    dev = resolve_device(device)
    model, meta = ckpt.load_model_file(weights, dev)
    name = dataset or meta.get("dataset")
    if name is None:
        raise ConfigError(f"{weights} does not name its dataset: pass --dataset")
    info = dataset_info(name)
    model_info = getattr(model, "info", None)
    expected = meta["model_kwargs"].get("num_classes", getattr(model_info, "num_classes", None))
    if expected is not None and expected != info.num_classes:
        raise ConfigError(f"{weights} predicts {expected} classes but {name} has {info.num_classes}")
    model_info_chans = getattr(model_info, "input_size", (None,))[0]
    chans = meta["model_kwargs"].get("in_chans", model_info_chans)
    if chans is not None and chans != info.image_size[2]:
        raise ConfigError(f"{weights} takes {chans}-channel images but {name} has "
                          f"{info.image_size[2]}-channel images: pass the --dataset it was trained on")
    if "pad_to" in meta:
        pad_to = meta["pad_to"]
    else:
        hw = model_input_hw(meta["model"])
        pad_to = hw if hw and hw > info.image_size[0] else None
    data = load_dataset(name, split, data_dir=data_dir)
    loader = DeviceLoader(data, batch_size=batch_size, shuffle=False, drop_last=False, seed=0, device=dev,
                          augment=None, normalize=bool(meta.get("normalize", True)), pad_to=pad_to)
    meta = {**meta, "weights": str(weights), "dataset": name, "split": split,
            "unique_params": count_params(model).unique}
    with torch.inference_mode():
        return evaluate(model, loader, dev), meta
