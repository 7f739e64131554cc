"""Released weights by name: the :class:`PretrainedCfg` table entry, the weights directory, checks.

A pretrained entry (registered by its model family, see :func:`dacnn.registry.register_pretrained`)
names a file relative to the weights directory, its sha256, where it comes from, its licence, the
dataset and the published accuracy, the command that reproduces that figure, and the ``create_model``
keyword arguments the weights need. The directory is searched in this order:

1. ``weights_dir`` passed by the caller (``--weights-dir`` on the command line);
2. each directory of ``$DACNN_WEIGHTS`` (a path list, ``os.pathsep``-separated: in a checkout of the
   project ``weights`` holds the weights it trained itself, and the Makefile adds the authors' LruNet
   release when it is at hand);
3. ``~/.cache/dacnn/weights`` (:data:`DEFAULT_WEIGHTS_DIR`).

The table of the weights the project trained (:data:`TRAINED_TABLE`, written by ``dacnn publish``)
is package data; the files it names are found on this search path like any other.

A file found but with another sha256 is an error (never silently used); a missing file lists every
directory looked in.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from dacnn.errors import CheckpointError
from dacnn.fileio import sha256_file, torch_load_reason

__all__ = ["PretrainedCfg", "DEFAULT_WEIGHTS_DIR", "TRAINED_TABLE", "weights_dirs", "find_weights",
           "read_checkpoint", "read_state_file", "load_pretrained", "current_key", "upgrade_state",
           "read_trained_table", "trained_cfg", "eval_command", "trained_entry", "TRAINED_FIELDS",
           "TRAINED_OPTIONAL"]

DEFAULT_WEIGHTS_DIR = Path("~/.cache/dacnn/weights").expanduser()
TRAINED_TABLE = Path(__file__).with_name("trained_weights.json")  # written by `dacnn publish`


@dataclass(frozen=True)
class PretrainedCfg:
    """One set of released (or self-trained) weights, ``<model>.<tag>``.

    ``filter_fn(state, model)`` turns the file's state_dict into the model's (key renames of the
    authors' release code); ``normalize``/``pad_to`` say how test images are fed (the reference's
    evaluation) and ``input_size`` the ``(C, H, W)`` they reach the model at (timm's pretrained
    ``input_size``; ``None``: the model's registered size); ``accuracy`` is the published top-1 (%)
    on ``dataset``'s test split and ``command`` the ``dacnn`` command line that reproduces it.
    """

    tag: str
    file: str
    sha256: str
    source: str
    licence: str
    dataset: str
    accuracy: float
    command: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    normalize: bool = True
    pad_to: int | None = None
    input_size: tuple[int, int, int] | None = None
    filter_fn: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None
    notes: str = ""
    tta: int = 0  # test-time augmentation level the accuracy was measured with (TrainConfig.tta)


def weights_dirs(weights_dir: str | Path | None = None) -> list[Path]:
    """The directories searched for pretrained files, in order (see the module docstring)."""
    dirs: list[Path] = []
    if weights_dir is not None:
        dirs.append(Path(weights_dir).expanduser())
    dirs += [Path(p).expanduser() for p in os.environ.get("DACNN_WEIGHTS", "").split(os.pathsep) if p]
    dirs.append(DEFAULT_WEIGHTS_DIR)
    return list(dict.fromkeys(dirs))


def find_weights(cfg: PretrainedCfg, weights_dir: str | Path | None = None, *, verify: bool = True) -> Path:
    """The first ``<dir>/<cfg.file>`` found; with ``verify`` its sha256 must be ``cfg.sha256``."""
    looked = weights_dirs(weights_dir)
    for root in looked:
        path = root / cfg.file
        if path.is_file():
            if verify:
                digest = sha256_file(path)
                if digest != cfg.sha256:
                    raise CheckpointError(
                        f"{path}: sha256 is {digest}, expected {cfg.sha256} for pretrained tag "
                        f"{cfg.tag!r} (altered or another file; delete it or point --weights-dir elsewhere)"
                    )
            return path
    where = ", ".join(str(d) for d in looked)
    raise CheckpointError(
        f"pretrained weights {cfg.file} (tag {cfg.tag!r}, sha256 {cfg.sha256[:12]}...) not found; looked "
        f"in {where}. Put the file there (source: {cfg.source}) or pass --weights-dir / set $DACNN_WEIGHTS"
    )


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, extras)`` from ``.safetensors`` or a PyTorch pickle (``torch.load(weights_only=True)``).

    A release checkpoint ``{'net': state, 'acc': ..., 'epoch': ...}`` (LruNet's format) is unwrapped,
    its ``acc``/``epoch`` returned as extras, and DataParallel's ``module.`` prefixes dropped.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path)), {}
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a pickle, objects weights_only refuses
        reason = torch_load_reason(exc)
        raise CheckpointError(f"{path} is not a trusted PyTorch checkpoint: {reason}") from None
    extras: dict[str, Any] = {}
    if isinstance(raw, dict) and "net" in raw:
        extras = {k: raw[k] for k in ("acc", "epoch") if k in raw}
        raw = raw["net"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: expected a dict with a 'net' state_dict (LruNet release format)")
    extras = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in extras.items()}
    return {k.removeprefix("module."): v for k, v in raw.items()}, extras


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict of :func:`read_checkpoint`."""
    return read_checkpoint(path)[0]


def current_key(model: nn.Module, key: str) -> str:
    """Today's name of a state_dict ``key`` saved under an older one: the model's ``legacy_keys``
    (``(regex, replacement)`` pairs, applied in order; e.g. DACNN's ``anchor.`` -> ``kernels.anchor.``)."""
    for pattern, repl in getattr(model, "legacy_keys", ()):
        key = re.sub(pattern, repl, key)
    return key


def upgrade_state(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with every key under :func:`current_key` (a no-op for today's names)."""
    return {current_key(model, k): v for k, v in state.items()}


def load_pretrained(model: nn.Module, cfg: PretrainedCfg, weights_dir: str | Path | None = None) -> nn.Module:
    """Find, verify and load ``cfg``'s weights into ``model`` (strict; a file written under the
    family's older names is renamed, :func:`upgrade_state`), returning it in eval mode."""
    path = find_weights(cfg, weights_dir)
    state = read_state_file(path)
    if cfg.filter_fn is not None:
        state = cfg.filter_fn(state, model)
    state = upgrade_state(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not fit {type(model).__name__} ({exc})") from None
    return model.eval()


# ---------------------------------------------------------------- weights trained by the project
# The trained-weights table's schema, in one place: every entry has the required fields; the
# optional ones are written by today's `dacnn publish` (older entries may lack them).
TRAINED_FIELDS = ("model", "tag", "file", "sha256", "bytes", "dataset", "accuracy", "model_kwargs",
                  "normalize", "pad_to", "trained_by")
TRAINED_OPTIONAL = ("input_size", "unique_params", "tta", "accuracy_no_tta", "train_cpu_seconds", "notes")


def trained_entry(**fields: Any) -> dict[str, Any]:
    """A table entry with exactly the schema's fields (a missing required or an unknown one raises)."""
    missing = [f for f in TRAINED_FIELDS if f not in fields]
    unknown = sorted(set(fields) - set(TRAINED_FIELDS) - set(TRAINED_OPTIONAL))
    if missing or unknown:
        raise ValueError(f"trained-weights entry: missing {missing}, unknown {unknown}")
    return dict(fields)


def read_trained_table(path: str | Path = TRAINED_TABLE) -> list[dict[str, Any]]:
    """The entries of the trained-weights table (a JSON list; absent file: none), each checked for
    every field :func:`trained_cfg` needs."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON table ({type(exc).__name__}: {exc})") from None
    if not isinstance(entries, list):
        raise CheckpointError(f"{path}: expected a JSON list of entries")
    for i, entry in enumerate(entries):
        missing = [f for f in TRAINED_FIELDS if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise CheckpointError(f"{path}: entry {i} lacks {', '.join(missing)}")
    return entries


def eval_command(entry: dict[str, Any]) -> str:
    """The ``dacnn eval`` line that reproduces a table entry's accuracy."""
    return f"dacnn eval --model {entry['model']}.{entry['tag']} --pretrained --dataset {entry['dataset']}"


def trained_cfg(entry: dict[str, Any]) -> PretrainedCfg:
    """A :class:`PretrainedCfg` for an entry of the trained-weights table: the accuracy is the test
    accuracy the training run measured with these weights (``trained_by`` says which run)."""
    run = entry["trained_by"]
    return PretrainedCfg(
        tag=entry["tag"], file=entry["file"], sha256=entry["sha256"],
        source=f"trained by dacnn: {run.get('experiment')}/{run.get('row')} seed {run.get('seed')} at commit "
               f"{str(run.get('git_commit'))[:12]} ({run.get('command')})",
        licence="MIT (this project)", dataset=entry["dataset"], accuracy=float(entry["accuracy"]),
        command=eval_command(entry),
        model_kwargs=dict(entry["model_kwargs"]), normalize=bool(entry["normalize"]),
        pad_to=entry["pad_to"], notes=entry.get("notes", ""),
        input_size=tuple(entry["input_size"]) if entry.get("input_size") else None,
        tta=int(entry.get("tta") or 0),
    )
