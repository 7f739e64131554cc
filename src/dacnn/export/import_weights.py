"""Import released weights into dacnn models.

LruNet (Köpüklü et al.) ships its trained models as PyTorch pickles (``*.t7``, a dict with ``net``, a
``DataParallel`` state_dict whose keys start with ``module.``, plus ``acc`` and ``epoch``; see
``../shared/reference/weights/lrunet/MANIFEST.json``). :func:`import_lrunet` reads one with
``torch.load(weights_only=True)``, checks its sha256 against the manifest beside it when that lists
the file, infers the configuration (input channels, width, reuse count, classes) from the tensor
shapes, renames the keys to :class:`~dacnn.models.lrunet.LruNet`'s and loads them strictly.

:func:`save_imported` writes the result as ``safetensors.torch.save_model`` + JSON sidecar (the
format ``dacnn eval`` reads: ``model``, ``model_kwargs``, ``dataset``, ``normalize``, ``pad_to``).
LruNet's reference evaluation uses pixels/255 without normalisation and Fashion-MNIST at 28x28, so
the sidecar says ``normalize: false`` and ``pad_to: null``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from dacnn.errors import CheckpointError
from dacnn.fileio import torch_load_reason

__all__ = [
    "import_lrunet", "lrunet_config_from_state", "convert_lrunet_state", "save_imported", "sha256_file",
]

WEIGHTS_FORMAT = "dacnn.weights/1"  # the sidecar format of dacnn.train.checkpoint
_KEY_RENAMES = ((r"^features\.", "stem."), (r"\.dw_bn_list\.", ".dw_bns."), (r"\.pw_bn_list\.", ".pw_bns."))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_entry(path: Path) -> dict[str, Any] | None:
    manifest = path.parent / "MANIFEST.json"
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text()).get("files", {})
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest}: not readable JSON ({exc})") from None
    return files.get(path.name)


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a pickle, truncated, or holding objects weights_only refuses
        reason = torch_load_reason(exc)
        raise CheckpointError(f"{path} is not a trusted PyTorch checkpoint: {reason}") from None
    if isinstance(raw, dict) and "net" in raw:
        state, extra = raw["net"], {k: raw[k] for k in ("acc", "epoch") if k in raw}
    elif isinstance(raw, dict) and all(isinstance(v, torch.Tensor) for v in raw.values()):
        state, extra = raw, {}
    else:
        raise CheckpointError(f"{path}: expected a dict with a 'net' state_dict (LruNet release format)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in extra.items()}


def lrunet_config_from_state(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, int]:
    """``layer_reuse``, ``width_mult``, ``num_classes``, ``in_chans`` of a reference LruNet state_dict."""
    try:
        stem = state["features.0.weight"]
        dw = state["stage1.dw.weight"]
        logits = state["classifier.4.weight"]
    except KeyError as exc:
        raise CheckpointError(f"{source}: not an LruNet state_dict (no key {exc.args[0]!r})") from None
    reuse = len({k for k in state if re.match(r"stage1\.dw_bn_list\.\d+\.weight$", k)})
    if dw.shape[0] % 128 or reuse < 1:
        raise CheckpointError(
            f"{source}: stage1.dw.weight has shape {tuple(dw.shape)}; expected (128*w, 1, 3, 3)"
        )
    return {
        "layer_reuse": reuse,
        "width_mult": dw.shape[0] // 128,
        "num_classes": int(logits.shape[0]),
        "in_chans": int(stem.shape[1]),
    }


def convert_lrunet_state(
    state: dict[str, torch.Tensor], model: nn.Module, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename reference keys to ``model``'s and check that keys and shapes match exactly."""
    converted = {}
    for key, value in state.items():
        for pattern, repl in _KEY_RENAMES:
            key = re.sub(pattern, repl, key)
        converted[key] = value
    ours = model.state_dict()
    for key, value in ours.items():  # checkpoints from PyTorch < 0.4.1 have no BN step counters
        if key.endswith("num_batches_tracked") and key not in converted:
            converted[key] = torch.zeros_like(value)
    missing = sorted(set(ours) - set(converted))
    unexpected = sorted(set(converted) - set(ours))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: keys do not match {type(model).__name__}: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}"
        )
    for key, value in ours.items():
        if converted[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(converted[key].shape)}, "
                f"the model expects {tuple(value.shape)}"
            )
    return converted


def _few(keys: list[str]) -> str:
    return str(keys[:5]) + (" ..." if len(keys) > 5 else "")


def _dataset_guess(config: dict[str, int]) -> str:
    if config["in_chans"] == 1:
        return "fashion_mnist"
    return "cifar100" if config["num_classes"] == 100 else "cifar10"


def import_lrunet(path: str | Path, *, verify: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Load a released LruNet checkpoint into our :class:`~dacnn.models.lrunet.LruNet`: ``(model, meta)``.

    ``meta`` has ``model``/``model_kwargs`` (for ``create_model``), ``dataset``, ``normalize``
    (False), ``pad_to`` (None), the checkpoint's ``acc``/``epoch``, ``sha256`` and the manifest
    entry. With ``verify`` a sha256 listed in ``MANIFEST.json`` beside the file must match.
    """
    from dacnn.registry import create_model

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    entry = _manifest_entry(path)
    digest = sha256_file(path)
    if verify and entry and entry.get("sha256") and entry["sha256"] != digest:
        raise CheckpointError(
            f"{path}: sha256 {digest} does not match {entry['sha256']} in {path.parent / 'MANIFEST.json'}"
        )
    state, extra = _read_checkpoint(path)
    config = lrunet_config_from_state(state, str(path))
    if entry:
        for field in ("layer_reuse", "width_mult"):
            if field in entry and int(entry[field]) != config[field]:
                raise CheckpointError(
                    f"{path}: manifest says {field}={entry[field]}, the tensors say {config[field]}"
                )
    name = {1: "lrunet_1x", 2: "lrunet_2x"}.get(config["width_mult"])
    if name is None:
        raise CheckpointError(f"{path}: width {config['width_mult']} has no registered LruNet")
    kwargs = {k: config[k] for k in ("layer_reuse", "num_classes", "in_chans")}
    model = create_model(name, **kwargs)
    model.load_state_dict(convert_lrunet_state(state, model, str(path)))
    meta = {
        "model": name,
        "model_kwargs": kwargs,
        "dataset": (entry or {}).get("dataset") or _dataset_guess(config),
        "normalize": False,
        "pad_to": None,
        "source": str(path.name),
        "sha256": digest,
        **extra,
    }
    if entry:
        meta["manifest"] = entry
    return model.eval(), meta


def save_imported(model: nn.Module, meta: dict[str, Any], out: str | Path) -> Path:
    """Write ``model`` with ``safetensors.torch.save_model`` and ``meta`` as the ``.json`` sidecar."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: output must end in .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": WEIGHTS_FORMAT, **meta}, indent=1, sort_keys=True, default=str)
    out.with_suffix(".json").write_text(text + "\n")
    save_model(model, str(out), metadata={"dacnn": text})
    return out
