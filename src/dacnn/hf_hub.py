"""Hugging Face Hub layout: ``save_pretrained(model, dir)``, ``from_pretrained(dir or "hf-hub:org/name")``.

A saved model is a folder of two files, the layout of timm's ``save_for_hf`` (``timm/models/_hub.py``):

* ``config.json``: ``architecture`` (the timm-bridge name ``dacnn_<model>``, so timm's own
  ``create_model("hf-hub:...")`` finds it once :func:`dacnn.timm_bridge.register` has run, and no timm
  name is shadowed), ``num_classes``, ``num_features``, ``global_pool`` (the head as it is now: a head
  replaced by ``reset_classifier`` is replaced again after the rebuild), ``model_args`` (the
  :func:`dacnn.create_model` kwargs that rebuild it, ``share_budget`` included) and ``pretrained_cfg``
  (timm's keys: input size, mean/std, licence, papers);
* ``model.safetensors``: the state_dict written by :func:`dacnn.checkpoint.save_weights`, each shared
  tensor once, with the model's description embedded (so :func:`dacnn.checkpoint.load_model_file`
  reads it alone too).

:func:`from_pretrained` rebuilds the model from ``config.json`` and loads the weights in copy mode, so
every use of a shared kernel applies the one loaded tensor. ``"hf-hub:org/name[@revision]"`` goes through
``huggingface_hub.hf_hub_download`` (optional dependency: ``pip install 'dacnn[hub]'``), which honours
``HF_HUB_OFFLINE=1`` and its cache (``HF_HUB_CACHE``); nothing here uploads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from dacnn import checkpoint
from dacnn.errors import CheckpointError
from dacnn.fileio import atomic_write_text
from dacnn.registry import create_model, list_models

__all__ = ["save_pretrained", "from_pretrained", "hub_name", "dacnn_name", "CONFIG_NAME", "WEIGHTS_NAME",
           "PREFIX"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREFIX = "dacnn_"  # the timm-bridge namespace (dacnn's resnet18 is a CIFAR net, timm's an ImageNet one)
_SOURCE_KEYS = ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict")


def hub_name(name: str) -> str:
    """A dacnn name as timm's registry sees it through the bridge (``resnet18`` -> ``dacnn_resnet18``)."""
    return PREFIX + name


def dacnn_name(name: str) -> str:
    """The dacnn model a ``config.json`` ``architecture`` names: ``dacnn_resnet18`` or ``resnet18``."""
    arch = name.partition(".")[0]
    if arch in list_models():
        return name
    if name.startswith(PREFIX) and name[len(PREFIX):].partition(".")[0] in list_models():
        return name[len(PREFIX):]
    raise CheckpointError(f"architecture {name!r} is no dacnn model (see dacnn.list_models())")


def _model_args(model: nn.Module) -> dict[str, Any]:
    """The ``create_model`` kwargs ``model`` was built with (a head replaced since is recorded apart:
    ``share_budget`` plans its ties over the parameters of the head built first)."""
    info = getattr(model, "info", None)
    if info is None:
        raise CheckpointError(f"{type(model).__name__} was not built by dacnn.create_model: nothing says how "
                              "to rebuild it")
    if getattr(model, "_depth", None) is not None or not hasattr(model, "forward_head"):
        raise CheckpointError("a pruned or features-only model cannot be rebuilt from its config; save the "
                              "model before prune_intermediate_layers / features_only")
    return dict(info.model_kwargs)


def save_pretrained(model: nn.Module, save_directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``model`` (built by :func:`dacnn.create_model`)
    into ``save_directory`` (created); returns the directory."""
    folder = Path(save_directory)
    args = _model_args(model)
    name = model.info.name
    pretrained = {k: v for k, v in getattr(model, "pretrained_cfg", {}).items() if k not in _SOURCE_KEYS}
    pretrained["architecture"] = hub_name(name)
    pretrained["num_classes"] = model.num_classes
    config: dict[str, Any] = {"architecture": hub_name(name), "num_classes": model.num_classes,
                              "num_features": getattr(model, "num_features", None),
                              "global_pool": getattr(model, "global_pool", None)}
    config["model_args"] = args
    config["pretrained_cfg"] = pretrained
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    meta = {"model": name, "model_kwargs": args}
    checkpoint.save_weights(model, folder / WEIGHTS_NAME, meta, sidecar=False)
    return folder


def _hub_files(source: str, cache_dir: str | Path | None) -> tuple[Path, Path]:
    repo, _, revision = source.removeprefix("hf-hub:").partition("@")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CheckpointError(f"{source}: reading from the Hugging Face Hub needs huggingface_hub "
                              "(pip install 'dacnn[hub]')") from None
    try:
        files = [Path(hf_hub_download(repo, name, revision=revision or None, cache_dir=cache_dir))
                 for name in (CONFIG_NAME, WEIGHTS_NAME)]
    except Exception as exc:  # offline and not cached, no such repo, no such file
        raise CheckpointError(f"{source}: cannot get {CONFIG_NAME} and {WEIGHTS_NAME} "
                              f"({type(exc).__name__}: {exc})") from None
    return files[0], files[1]


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON config ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise CheckpointError(f"{path}: a config.json needs an 'architecture' (a model name)")
    for key in ("model_args", "pretrained_cfg"):
        if not isinstance(config.get(key, {}), dict):
            raise CheckpointError(f"{path}: '{key}' must be a mapping")
    return config


def from_pretrained(
    source: str | Path, *, cache_dir: str | Path | None = None, device: str = "cpu", **kwargs: Any
) -> nn.Module:
    """The model saved by :func:`save_pretrained` in folder ``source``, or in Hub repository
    ``"hf-hub:org/name[@revision]"``, with its weights, in eval mode. ``kwargs`` override the saved
    ``model_args`` (the weights must still fit)."""
    if str(source).startswith("hf-hub:"):
        config_path, weights_path = _hub_files(str(source), cache_dir)
        origin = {"hf_hub_id": str(source).removeprefix("hf-hub:").partition("@")[0], "source": "hf-hub"}
    else:
        folder = Path(source)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not config_path.is_file():
            raise CheckpointError(f"{folder}: no {CONFIG_NAME} (a folder written by save_pretrained)")
        origin = {"file": str(weights_path), "source": "file"}
    config = _read_config(config_path)
    name = dacnn_name(config["architecture"])
    args = {**config.get("model_args", {}), **kwargs}
    try:
        model = create_model(name, **args)
    except Exception as exc:  # the registry and the model constructors raise many types
        raise CheckpointError(f"{config_path}: cannot build {name!r} with {args}: {exc}") from None
    head = (config.get("num_classes", model.num_classes), config.get("global_pool", model.global_pool))
    if "num_classes" not in kwargs and head != (model.num_classes, model.global_pool):
        model.reset_classifier(*head)  # the head replaced after the model was built (and tied)
    checkpoint.load_weights(model, weights_path, device)
    saved = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.get("pretrained_cfg", {}).items()}
    model.pretrained_cfg = {**model.pretrained_cfg, **saved, "architecture": name, **origin}
    model.default_cfg = model.pretrained_cfg
    return model.to(device).eval()
