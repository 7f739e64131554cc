"""Convert released weights to dacnn files: the converter behind ``dacnn import-weights``.

LruNet (Köpüklü et al.) ships its trained models as PyTorch pickles (``*.t7``, a dict with ``net``, a
``DataParallel`` state_dict whose keys start with ``module.``, plus ``acc`` and ``epoch``; see
the ``MANIFEST.json`` beside the authors' release). :func:`import_lrunet` reads one with
``torch.load(weights_only=True)`` (:func:`dacnn.hub.read_checkpoint`), checks its sha256 against the
manifest beside it when that lists the file, infers the configuration (input channels, width, reuse
count, classes) from the tensor shapes, renames the keys with LruNet's ``checkpoint_filter_fn`` (the
same one ``create_model(..., pretrained=True)`` uses) and loads them strictly. A file that is one of
the registered pretrained entries (:func:`dacnn.list_pretrained`) is named by its tag in ``meta``.

:func:`save_imported` writes the result with :func:`dacnn.checkpoint.save_weights` (safetensors + JSON
sidecar, the format ``dacnn eval`` reads: ``model``, ``model_kwargs``, ``dataset``, ``normalize``,
``pad_to``). LruNet's reference evaluation uses pixels/255 without normalisation and Fashion-MNIST at
28x28, so the sidecar says ``normalize: false`` and ``pad_to: null``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from dacnn import checkpoint as ckpt
from dacnn.errors import CheckpointError
from dacnn.fileio import sha256_file
from dacnn.hub import read_checkpoint
from dacnn.models.lrunet import checkpoint_filter_fn, config_from_state
from dacnn.registry import create_model, list_pretrained, pretrained_cfg

__all__ = ["import_lrunet", "save_imported"]


def _manifest_entry(path: Path) -> dict[str, Any] | None:
    manifest = path.parent / "MANIFEST.json"
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text()).get("files", {})
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest}: not readable JSON ({exc})") from None
    return files.get(path.name)


def _dataset_guess(config: dict[str, int]) -> str:
    if config["in_chans"] == 1:
        return "fashion_mnist"
    return "cifar100" if config["num_classes"] == 100 else "cifar10"


def _pretrained_name(digest: str) -> str | None:
    return next((n for n in list_pretrained("lrunet*") if pretrained_cfg(n).sha256 == digest), None)


def import_lrunet(path: str | Path, *, verify: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Load a released LruNet checkpoint into our :class:`~dacnn.models.lrunet.LruNet`: ``(model, meta)``.

    ``meta`` has ``model``/``model_kwargs`` (for ``create_model``), ``dataset``, ``normalize``
    (False), ``pad_to`` (None), the checkpoint's ``acc``/``epoch``, ``sha256``, the manifest entry
    and, for a registered release, ``pretrained`` (its ``<model>.<tag>``). With ``verify`` a sha256
    listed in ``MANIFEST.json`` beside the file must match.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    entry = _manifest_entry(path)
    digest = sha256_file(path)
    if verify and entry and entry.get("sha256") and entry["sha256"] != digest:
        raise CheckpointError(
            f"{path}: sha256 {digest} does not match {entry['sha256']} in {path.parent / 'MANIFEST.json'}"
        )
    state, extra = read_checkpoint(path)
    config = config_from_state(state, str(path))
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
    model.load_state_dict(checkpoint_filter_fn(state, model, str(path)))
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
    tag = _pretrained_name(digest)
    if tag:
        meta["pretrained"] = tag
    if entry:
        meta["manifest"] = entry
    return model.eval(), meta


def save_imported(model: nn.Module, meta: dict[str, Any], out: str | Path) -> Path:
    """Write ``model`` and ``meta`` (atomically) as a weights file + JSON sidecar."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: output must end in .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    return ckpt.save_weights(model, out, meta)
