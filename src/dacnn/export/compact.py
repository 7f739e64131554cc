"""Compact safetensors export (``dacnn export --format safetensors``): every tensor stored once.

What the file holds (format ``dacnn-compact/1``):

* each conv/linear weight (2-D or more) under its ``state_dict`` name, once: a shared kernel is one
  tensor owned by its :class:`~dacnn.shared_kernel.SharedKernel`, and aliases (a module registered under
  two parents) are recorded in the metadata instead of stored again;
* every 1-D tensor (BatchNorm weight/bias/running statistics, biases) concatenated into
  one ``__vectors__`` tensor, with its index (names and shapes; JSON, zlib-compressed, base64) in
  the metadata. A deep DACNN or LruNet has a BatchNorm per use, and one safetensors header entry
  per vector would cost ~90 bytes each (3 % of an fp16 DACNN-34);
* BatchNorm's ``num_batches_tracked`` is dropped: it is a training counter, not needed at inference;
* ``fp16`` casts every float tensor (a value beyond the float16 range is an error, not an inf);
  ``int8`` quantises the weights per output channel (:mod:`dacnn.quantize`, a shared kernel
  once), stores their float32 scales in ``__scales__`` (in the order of ``dacnn.quantized``) and
  the vectors in float16 as the fp16 export does (float32 if one would overflow). LruNet's
  per-use BatchNorms are 27 % of its values: float32 vectors would keep its int8 file at 0.63 of
  fp32 instead of ~0.38;
* metadata: model name and kwargs (so the loader can rebuild it), shared tensors and their uses,
  parameter counts and any extra key/values (dataset, accuracy, source).

BatchNorm running statistics are kept (no folding: folding a per-use BN into a shared kernel would
untie it, ``docs/reference/PITFALLS.md`` item 5), so the size convention is
``file bytes / ((unique params + float buffers) x bytes per value)``, at most 1.02 above 100k params.
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from dacnn.compact_format import (
    DTYPES,
    FORMAT,
    SCALES,
    TRAINING_ONLY,
    VECTORS,
    ZLIB_PREFIX,
)
from dacnn.counting import count_params
from dacnn.errors import ConfigError
from dacnn.fileio import atomic_write
from dacnn.quantize import is_quantizable, quantize_per_channel
from dacnn.registry import create_model

__all__ = ["ExportInfo", "unique_state", "export_safetensors"]


@dataclass(frozen=True)
class ExportInfo:
    """What :func:`export_safetensors` wrote."""

    path: Path
    dtype: str
    file_bytes: int
    unique_params: int
    buffer_values: int

    @property
    def bytes_per_value(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def size_ratio(self) -> float:
        """``file bytes / ((unique params + float buffers) x bytes per value)`` (int8: 1 byte)."""
        return self.file_bytes / ((self.unique_params + self.buffer_values) * self.bytes_per_value)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=False)


def _packed_json(value: Any) -> str:
    """JSON, zlib-compressed and base64-encoded: the vector index repeats module names a lot
    (LruNet-14: 264 BatchNorm vectors, 11 kB as JSON, 2.6 % of an fp16 file; ~1 kB packed)."""
    return ZLIB_PREFIX + base64.b64encode(zlib.compress(_json(value).encode(), 9)).decode()


def _to_half(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``tensor`` as float16; values beyond its range (65504) raise instead of becoming inf."""
    half = tensor.detach().half().contiguous()
    if not bool(torch.isfinite(half).all()):
        big = tensor.detach().abs().max().item()
        raise ConfigError(f"{name}: values up to {big:.3g} exceed the float16 range; export fp32 or int8")
    return half


def unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state_dict`` entries once per tensor, in order, without training counters.

    Returns ``(stored, aliases)``: ``stored`` maps the first name of each tensor to it, ``aliases``
    maps every further name of the same tensor to that first name.
    """
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor) or name.rsplit(".", 1)[-1] in TRAINING_ONLY:
            continue
        if id(tensor) in first_name:
            aliases[name] = first_name[id(tensor)]
            continue
        first_name[id(tensor)] = name
        stored[name] = tensor.detach()
    return stored, aliases


def _default_spec(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """Model name and the kwargs :func:`dacnn.create_model` built it with (``model.info``)."""
    info = getattr(model, "info", None)
    if info is None:
        return "", {}
    return info.name, dict(info.model_kwargs)


def _check_rebuilds(name: str, kwargs: dict[str, Any], stored: dict[str, torch.Tensor]) -> None:
    """Guessed kwargs must rebuild tensors of the same shapes (built on the meta device: no memory)."""
    try:
        with torch.device("meta"):
            rebuilt, _ = unique_state(create_model(name, **kwargs))
    except (KeyError, TypeError, ValueError):
        rebuilt = {}
    if {k: v.shape for k, v in rebuilt.items()} != {k: v.shape for k, v in stored.items()}:
        raise ConfigError(
            f"cannot tell which create_model({name!r}, ...) arguments built this model ({kwargs} do not "
            "rebuild it): pass model_kwargs= (e.g. width, num_classes)"
        )


def export_safetensors(
    model: nn.Module,
    path: str | os.PathLike[str],
    dtype: str = "fp32",
    *,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> ExportInfo:
    """Write ``model`` as a compact safetensors file (see the module docstring) and describe it.

    ``model_name``/``model_kwargs`` let :func:`load_exported` rebuild the model with
    :func:`dacnn.create_model`; by default they are read from ``model.info`` (and checked to rebuild
    tensors of the stored shapes, e.g. after ``reset_classifier``).
    """
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    default_name, default_kwargs = _default_spec(model)
    name = model_name if model_name is not None else default_name
    kwargs = model_kwargs if model_kwargs is not None else default_kwargs
    stored, aliases = unique_state(model)
    if name and model_kwargs is None:
        _check_rebuilds(name, kwargs, stored)
    tensors: dict[str, torch.Tensor] = {}
    vectors: list[tuple[str, torch.Tensor]] = []
    quantized: list[str] = []
    scales: list[torch.Tensor] = []
    for key, tensor in stored.items():
        if not tensor.is_floating_point():
            tensors[key] = tensor.contiguous()
        elif tensor.dim() < 2:
            vectors.append((key, tensor))
        elif dtype == "int8" and is_quantizable(tensor):
            tensors[key], scale = quantize_per_channel(tensor)
            scales.append(scale)
            quantized.append(key)
        else:
            tensors[key] = _to_half(tensor, key) if dtype == "fp16" else tensor.float().contiguous()
    if vectors:
        pack = torch.cat([v.detach().reshape(-1).float() for _, v in vectors])
        if dtype == "fp16":
            pack = _to_half(pack, "BatchNorm/bias vectors")
        elif dtype == "int8" and bool(torch.isfinite(pack.half()).all()):
            pack = pack.half()  # per-use BN vectors are most of an int8 LruNet
        tensors[VECTORS] = pack
    if scales:
        tensors[SCALES] = torch.cat(scales)
    tensors = {k: v.cpu() for k, v in tensors.items()}

    counts = count_params(model)
    buffer_values = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    metadata = {
        "format": "pt",
        "dacnn.format": FORMAT,
        "dacnn.dtype": dtype,
        "dacnn.model": name,
        "dacnn.model_kwargs": _json(kwargs),
        "dacnn.vectors": _packed_json([[k, list(v.shape)] for k, v in vectors]),
        "dacnn.quantized": _json(quantized),
        "dacnn.aliases": _json(aliases),
        "dacnn.shared": _json([[s.name, s.uses, s.numel] for s in counts.shared]),
        "dacnn.params": _json({"unique": counts.unique, "per_use": counts.per_use, "buffers": buffer_values}),
        "dacnn.meta": _json(meta or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return ExportInfo(path, dtype, path.stat().st_size, counts.unique, buffer_values)
