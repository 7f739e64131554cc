"""Checkpoints that survive a kill: safetensors weights, a weights-only training state, atomic writes.

Layout of ``<run>/checkpoints/`` (one *version* per save, named ``e<epoch>-s<step>``):

* ``<version>.safetensors``: the model, written by ``safetensors.torch.save_model`` so each shared
  tensor is stored once (``../shared/reference/PITFALLS.md`` item 3); ``<version>-ema.safetensors``
  holds the EMA weights when EMA is on. Each weights file has a JSON sidecar ``<file>.json`` (the
  same JSON is also embedded in the file's metadata) naming the model, its ``create_model`` keyword
  arguments and the dataset, so :func:`load_model_file` rebuilds the model from the file alone.
* ``<version>.state.pt``: optimizer, schedule, RNG states, position in the data (epoch, batches
  done), best metric and the config, all plain tensors/containers: it loads with
  ``torch.load(weights_only=True)`` and nothing is ever unpickled beyond that.
* ``last.json`` / ``best.json``: pointers to a version. They are written last, so they are the
  commit point: a kill at any moment leaves them naming a complete version.

Every file is written to a temporary name in the same directory, fsynced, renamed over the target
with ``os.replace`` and the directory fsynced (:func:`atomic_write`). Versions no pointer names are
deleted after the pointers move.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from dacnn.errors import CheckpointError
from dacnn.fileio import atomic_write, atomic_write_text
from dacnn.registry import create_model

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "save_weights",
    "load_weights",
    "save_checkpoint",
    "read_pointer",
    "load_state",
    "load_model_file",
    "read_sidecar",
    "capture_rng",
    "restore_rng",
    "WEIGHTS_FORMAT",
]

WEIGHTS_FORMAT = "dacnn.weights/1"
STATE_FORMAT = "dacnn.train_state/1"
METADATA_KEY = "dacnn"


# ---------------------------------------------------------------- weights + sidecar


def sidecar_path(weights_path: str | Path) -> Path:
    """``x.safetensors`` -> ``x.json``."""
    return Path(weights_path).with_suffix(".json")


def save_weights(model: nn.Module, path: str | Path, meta: dict[str, Any]) -> Path:
    """Atomically write ``model`` with ``save_model`` plus its JSON sidecar (written first)."""
    path = Path(path)
    meta = {"format": WEIGHTS_FORMAT, **meta}
    text = json.dumps(meta, indent=1, sort_keys=True)
    atomic_write_text(sidecar_path(path), text + "\n")
    atomic_write(path, lambda tmp: save_model(model, str(tmp), metadata={METADATA_KEY: text}))
    return path


def load_weights(model: nn.Module, path: str | Path, device: str | torch.device = "cpu") -> None:
    """``safetensors.torch.load_model`` in copy mode (keeps tied tensors tied), strict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device=str(device))
    except Exception as exc:  # corrupt header, shape mismatch
        raise CheckpointError(f"cannot load weights {path}: {exc}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"weights {path} do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON description of a weights file: sidecar ``<file>.json``, else the embedded metadata."""
    path = Path(path)
    side = sidecar_path(path)
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"sidecar {side} is not valid JSON: {exc}") from None
    else:
        try:
            with safe_open(str(path), framework="pt") as f:
                embedded = (f.metadata() or {}).get(METADATA_KEY)
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
        if embedded is None:
            raise CheckpointError(
                f"{path} has no sidecar {side.name} and no embedded '{METADATA_KEY}' metadata "
                "naming the model"
            )
        meta = json.loads(embedded)
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(f"description of {path} lacks the field 'model'")
    meta.setdefault("model_kwargs", {})
    return meta


def load_model_file(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a ``.safetensors`` file describes and load it: ``(model, meta)``.

    ``meta`` (the sidecar) has ``model``, ``model_kwargs`` (given to ``create_model``: e.g. width,
    num_classes, in_chans) and optionally ``dataset``, ``normalize``, ``pad_to``. Any weights file
    with such a sidecar works: training checkpoints and imported released weights alike.
    """

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    meta = read_sidecar(path)
    try:
        model = create_model(meta["model"], **meta["model_kwargs"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot build model {meta['model']!r}: {exc}") from None
    load_weights(model, path, device)
    return model.to(device), meta


# ---------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors and builtins (weights-only safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- training state


def version_name(epoch: int, step: int) -> str:
    return f"e{epoch:04d}-s{step:08d}"


def save_checkpoint(
    ckpt_dir: str | Path,
    *,
    model: nn.Module,
    ema_model: nn.Module | None,
    state: dict[str, Any],
    meta: dict[str, Any],
    is_best: bool,
) -> Path:
    """Write one version (weights, EMA weights, state), then move ``last`` (and ``best``) to it.

    ``state`` must hold ``epoch``, ``batches_done`` and ``global_step``; ``meta`` is the sidecar
    content. Returns the state file.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    version = version_name(state["epoch"], state["global_step"])
    weights = save_weights(model, ckpt_dir / f"{version}.safetensors", {**meta, "ema": False})
    eval_weights = weights
    if ema_model is not None:
        eval_weights = save_weights(ema_model, ckpt_dir / f"{version}-ema.safetensors", {**meta, "ema": True})
    state = {**state, "format": STATE_FORMAT, "weights": weights.name,
             "ema_weights": eval_weights.name if ema_model is not None else None}
    state_path = ckpt_dir / f"{version}.state.pt"
    atomic_write(state_path, lambda tmp: torch.save(state, tmp))
    pointer = {"version": version, "state": state_path.name, "weights": weights.name,
               "eval_weights": eval_weights.name, "epoch": state["epoch"],
               "batches_done": state["batches_done"], "global_step": state["global_step"],
               "best_val_acc": state.get("best", {}).get("val_acc")}
    atomic_write_text(ckpt_dir / "last.json", json.dumps(pointer, indent=1) + "\n")
    if is_best:
        atomic_write_text(ckpt_dir / "best.json", json.dumps(pointer, indent=1) + "\n")
    _remove_unreferenced(ckpt_dir)
    return state_path


def _remove_unreferenced(ckpt_dir: Path) -> None:
    keep = set()
    for name in ("last.json", "best.json"):
        try:
            keep.add(json.loads((ckpt_dir / name).read_text())["version"])
        except (OSError, json.JSONDecodeError, KeyError):
            continue
    for path in ckpt_dir.glob("e*-s*"):
        if path.name.split(".")[0].removesuffix("-ema") not in keep:
            path.unlink(missing_ok=True)
    for path in ckpt_dir.glob(".*.tmp*"):  # left by a write that was killed
        path.unlink(missing_ok=True)


def read_pointer(ckpt_dir: str | Path, which: str = "last") -> dict[str, Any]:
    """The ``last``/``best`` pointer of a checkpoint directory."""
    path = Path(ckpt_dir) / f"{which}.json"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def load_state(path: str | Path) -> dict[str, Any]:
    """A training state file, loaded with ``torch.load(weights_only=True)`` (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read training state {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a dacnn training state ({STATE_FORMAT})")
    return state
