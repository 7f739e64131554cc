"""Checkpoints that survive a kill: safetensors weights, a weights-only training state, atomic writes.

Layout of ``<run>/checkpoints/`` (one *version* per save, named ``e<epoch>-s<step>``):

* ``<version>.safetensors``: the model, written by ``safetensors.torch.save_model`` so each shared
  tensor is stored once (``docs/reference/PITFALLS.md`` item 3); ``<version>-ema.safetensors``
  holds the EMA weights when EMA is on. Each weights file has a JSON sidecar ``<file>.json`` (the
  same JSON is also embedded in the file's metadata) naming the model, its ``create_model`` keyword
  arguments and the dataset, so :func:`load_model_file` rebuilds the model from the file alone.
* ``<version>.state.pt``: optimizer, schedule, RNG states, position in the data (epoch, batches
  done), best metric and the config, all plain tensors/containers: it loads with
  ``torch.load(weights_only=True)`` and nothing is ever unpickled beyond that.
* ``last.json`` / ``best.json``: pointers to a version. They are written last, so they are the
  commit point: a kill at any moment leaves them naming a complete version.

Every file is written to a temporary name in the same directory, fsynced, renamed over the target
with ``os.replace`` and the directory fsynced (:func:`atomic_write`). The state records the sha256 of
its weights, so a damaged version is recognised (:func:`newest_valid`). The ``keep`` newest versions
(default 2) and the one ``best`` names are kept, older ones are deleted after the pointers move: one
corrupted version still leaves one to resume from. A failed save (full disk) deletes what it wrote
and leaves the pointers on the last good version.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from dacnn.errors import CheckpointError, WriteError
from dacnn.fileio import atomic_write, atomic_write_text, sha256_file, torch_load_reason, write_error
from dacnn.hub import current_key, upgrade_state  # the family's legacy_keys (defined beside load_pretrained)
from dacnn.registry import create_model

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "save_weights",
    "load_weights",
    "save_checkpoint",
    "read_pointer",
    "load_state",
    "newest_valid",
    "completed_epochs",
    "list_versions",
    "load_model_file",
    "read_sidecar",
    "capture_rng",
    "restore_rng",
    "WEIGHTS_FORMAT",
]

WEIGHTS_FORMAT = "dacnn.weights/1"
STATE_FORMAT = "dacnn.train_state/1"
METADATA_KEY = "dacnn"
KEEP_VERSIONS = 2


# ---------------------------------------------------------------- weights + sidecar


def sidecar_path(weights_path: str | Path) -> Path:
    """``x.safetensors`` -> ``x.json``."""
    return Path(weights_path).with_suffix(".json")


def save_weights(model: nn.Module, path: str | Path, meta: dict[str, Any], *, sidecar: bool = True) -> Path:
    """Atomically write ``model`` with ``save_model`` (each shared tensor once, ``meta`` embedded) plus,
    with ``sidecar``, the same JSON beside it (written first)."""
    path = Path(path)
    meta = {"format": WEIGHTS_FORMAT, **meta}
    text = json.dumps(meta, indent=1, sort_keys=True)
    if sidecar:
        atomic_write_text(sidecar_path(path), text + "\n")
    atomic_write(path, lambda tmp: save_model(model, str(tmp), metadata={METADATA_KEY: text}))
    return path


def _has_legacy_keys(model: nn.Module, keys: list[str]) -> bool:
    return any(current_key(model, k) != k for k in keys)


def load_weights(model: nn.Module, path: str | Path, device: str | torch.device = "cpu") -> None:
    """``safetensors.torch.load_model`` in copy mode (keeps tied tensors tied), strict; a file saved
    under a family's older names (:func:`current_key`) is renamed on the way in."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            legacy = _has_legacy_keys(model, list(f.keys()))
        if legacy:
            state = upgrade_state(model, load_file(str(path), str(device)))
            result = model.load_state_dict(state, strict=False)
            missing, unexpected = result.missing_keys, result.unexpected_keys
        else:
            missing, unexpected = load_model(model, str(path), strict=False, device=str(device))
    except Exception as exc:  # corrupt header, shape mismatch
        raise CheckpointError(f"cannot load weights {path}: {exc}") from None
    if missing or unexpected:
        raise CheckpointError(f"weights {path} do not match the model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON description of a weights file: sidecar ``<file>.json``, else the embedded metadata."""
    path = Path(path)
    side = sidecar_path(path)
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"sidecar {side} is not valid JSON ({type(exc).__name__})") from None
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
        try:
            meta = json.loads(embedded)
        except ValueError as exc:
            raise CheckpointError(f"{path}: embedded '{METADATA_KEY}' metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), str):
        raise CheckpointError(f"description of {path} lacks the field 'model' (a model name)")
    meta.setdefault("model_kwargs", {})
    if not isinstance(meta["model_kwargs"], dict):
        raise CheckpointError(f"description of {path}: 'model_kwargs' must be a mapping")
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
        with torch.device("meta"):  # shapes first: a damaged description must not allocate gigabytes
            skeleton = create_model(meta["model"], **meta["model_kwargs"])
    except Exception as exc:  # the registry and the model constructors raise many types
        raise CheckpointError(f"{path}: cannot build model {meta['model']!r}: {exc}") from None
    _check_shapes(skeleton, path)
    model = create_model(meta["model"], **meta["model_kwargs"])
    load_weights(model, path, device)
    return model.to(device), meta


def _check_shapes(model: nn.Module, path: Path) -> None:
    """Every tensor the file stores exists in ``model`` with the same shape."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {current_key(model, k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    wrong = [k for k, shape in stored.items() if expected.get(k) != shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"weights {path} do not match the model its description names: {k} is "
                              f"{stored[k]} in the file, {expected.get(k, 'absent')} in the model")


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
    keep: int = KEEP_VERSIONS,
) -> Path:
    """Write one version (weights, EMA weights, state), then move ``last`` (and ``best``) to it.

    ``state`` must hold ``epoch``, ``batches_done``, ``epoch_done`` and ``global_step``; ``meta`` is
    the sidecar content; the ``keep`` newest versions stay on disk. Returns the state file. A write
    that fails removes this version's files and raises :class:`~dacnn.errors.WriteError`.
    """
    ckpt_dir = Path(ckpt_dir)
    version = version_name(state["epoch"], state["global_step"])
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        return _save_version(ckpt_dir, version, model, ema_model, state, meta, is_best, keep)
    except Exception as exc:
        error = write_error(ckpt_dir, exc)
        if error is None:
            raise
        _remove_version(ckpt_dir, version)
        last = ckpt_dir / "last.json"
        kept = f"the last good checkpoint ({last}) is kept" if last.is_file() else "no checkpoint was kept"
        raise WriteError(error.errno, f"{error}; checkpoint {version} was not saved and {kept}",
                         error.filename) from None


def _save_version(ckpt_dir: Path, version: str, model: nn.Module, ema_model: nn.Module | None,
                  state: dict[str, Any], meta: dict[str, Any], is_best: bool, keep: int) -> Path:
    weights = save_weights(model, ckpt_dir / f"{version}.safetensors", {**meta, "ema": False})
    eval_weights = weights
    if ema_model is not None:
        eval_weights = save_weights(ema_model, ckpt_dir / f"{version}-ema.safetensors", {**meta, "ema": True})
    state = {**state, "format": STATE_FORMAT, "weights": weights.name,
             "ema_weights": eval_weights.name if ema_model is not None else None,
             "sha256": {p.name: sha256_file(p) for p in {weights, eval_weights}}}
    state_path = ckpt_dir / f"{version}.state.pt"
    buffer = io.BytesIO()  # serialise first: torch.save's own write errors are cryptic
    torch.save(state, buffer)
    atomic_write(state_path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    pointer = _pointer(version, state, state_path.name, weights.name, eval_weights.name)
    atomic_write_text(ckpt_dir / "last.json", json.dumps(pointer, indent=1) + "\n")
    if is_best:
        atomic_write_text(ckpt_dir / "best.json", json.dumps(pointer, indent=1) + "\n")
    _remove_old(ckpt_dir, keep)
    return state_path


def _pointer(version: str, state: dict[str, Any], state_name: str, weights: str,
             eval_weights: str) -> dict[str, Any]:
    return {"version": version, "state": state_name, "weights": weights, "eval_weights": eval_weights,
            "epoch": state["epoch"], "batches_done": state["batches_done"],
            "epoch_done": bool(state.get("epoch_done", False)), "global_step": state["global_step"],
            "best_val_acc": state.get("best", {}).get("val_acc")}


def _version_of(path: Path) -> str:
    return path.name.split(".")[0].removesuffix("-ema")


def list_versions(ckpt_dir: str | Path) -> list[str]:
    """Versions that have a state file, newest first (names sort by epoch, then step)."""
    return sorted({_version_of(p) for p in Path(ckpt_dir).glob("e*-s*.state.pt")}, reverse=True)


def _remove_version(ckpt_dir: Path, version: str) -> None:
    for path in ckpt_dir.glob(f"{version}*"):
        if _version_of(path) == version:
            path.unlink(missing_ok=True)


def _remove_old(ckpt_dir: Path, keep: int) -> None:
    """Delete versions that are neither among the ``keep`` newest nor named by a pointer."""
    wanted = set(list_versions(ckpt_dir)[: max(1, keep)])
    for name in ("last.json", "best.json"):
        try:
            wanted.add(json.loads((ckpt_dir / name).read_text())["version"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    for path in ckpt_dir.glob("e*-s*"):
        if _version_of(path) not in wanted:
            path.unlink(missing_ok=True)
    for path in ckpt_dir.glob(".*.tmp*"):  # left by a write that was killed
        path.unlink(missing_ok=True)


def read_pointer(ckpt_dir: str | Path, which: str = "last") -> dict[str, Any]:
    """The ``last``/``best`` pointer of a checkpoint directory."""
    path = Path(ckpt_dir) / f"{which}.json"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint: {path} does not exist")
    try:
        pointer = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint pointer ({type(exc).__name__})") from None
    names = ("state", "weights")
    if not isinstance(pointer, dict) or not all(isinstance(pointer.get(k), str) for k in names):
        raise CheckpointError(f"{path} is not a checkpoint pointer (no 'state' and 'weights' file names)")
    pointer.setdefault("eval_weights", pointer["weights"])
    return pointer


def load_state(path: str | Path) -> dict[str, Any]:
    """A training state file, loaded with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

    Anything else (a truncated or random file, a pickle needing arbitrary code) is refused with a
    :class:`CheckpointError` that says the file is not a trusted dacnn training state.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = torch_load_reason(exc)
        raise CheckpointError(f"{path} is not a trusted dacnn training state: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a dacnn training state ({STATE_FORMAT})")
    return state


def completed_epochs(ckpt_dir: str | Path) -> int | None:
    """Epochs the ``last`` checkpoint covers (0 with no checkpoint; None when it is unreadable)."""
    if not (Path(ckpt_dir) / "last.json").is_file():
        return 0
    try:
        pointer = read_pointer(ckpt_dir, "last")
        done = pointer.get("epoch_done")
        if done is None:
            done = load_state(Path(ckpt_dir) / pointer["state"])["epoch_done"]
        return int(pointer["epoch"]) + (1 if done else 0)
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


def check_version(ckpt_dir: str | Path, pointer: dict[str, Any]) -> dict[str, Any]:
    """The state a pointer names, after checking its weights' sha256 (when the state records them)."""
    ckpt_dir = Path(ckpt_dir)
    state = load_state(ckpt_dir / pointer["state"])
    for name in {state.get("weights"), state.get("ema_weights")} - {None}:
        path = ckpt_dir / str(name)
        if not path.is_file():
            raise CheckpointError(f"weights file {path} does not exist")
        expected = (state.get("sha256") or {}).get(name)
        if expected is not None and sha256_file(path) != expected:
            raise CheckpointError(f"{path} is damaged (its sha256 differs from the one saved with it)")
    return state


def newest_valid(ckpt_dir: str | Path,
                 which: str = "last") -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """``(pointer, state, note)`` of the version ``which`` names, else of the newest intact version.

    ``note`` says why the pointer's version was passed over (None when it was intact). Raises
    :class:`CheckpointError` when no intact version is left.
    """
    ckpt_dir = Path(ckpt_dir)
    problems: list[str] = []
    tried: set[str] = set()
    try:
        pointer = read_pointer(ckpt_dir, which)
        tried.add(pointer["state"])
        return pointer, check_version(ckpt_dir, pointer), None
    except CheckpointError as exc:
        problems.append(str(exc))
    for version in list_versions(ckpt_dir):
        if f"{version}.state.pt" in tried:
            continue
        try:
            state = load_state(ckpt_dir / f"{version}.state.pt")
            pointer = _pointer(version, state, f"{version}.state.pt", str(state["weights"]),
                               str(state.get("ema_weights") or state["weights"]))
            state = check_version(ckpt_dir, pointer)
        except (CheckpointError, KeyError, TypeError) as exc:
            problems.append(str(exc))
            continue
        return pointer, state, f"{problems[0]}; using the newest intact checkpoint {version} instead"
    raise CheckpointError(f"no intact checkpoint in {ckpt_dir}: " + "; ".join(problems))
