"""The compact safetensors format (``dacnn-compact/1``) and its reader: what a compact export holds.

:func:`dacnn.export.compact.export_safetensors` writes it (the module docstring there says what is
stored and why); :func:`load_exported` rebuilds a model from it and :func:`read_export` gives its
float state dict (vectors unpacked, int8 dequantised: :mod:`dacnn.quantize`). Reading is part of
loading (:mod:`dacnn.loading`), so it lives beside the checkpoint format, not in ``export/``.
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from dacnn import checkpoint as ckpt
from dacnn.errors import CheckpointError
from dacnn.quantize import dequantize_per_channel
from dacnn.registry import create_model

__all__ = ["FORMAT", "DTYPES", "ExportHeader", "read_export", "load_exported", "load_state_into",
           "is_compact_export", "parse_header"]

FORMAT = "dacnn-compact/1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}
VECTORS = "__vectors__"
SCALES = "__scales__"
SCALE_SUFFIX = ":scale"  # how inspect names a scale row; state_dict names never contain ':'
TRAINING_ONLY = ("num_batches_tracked",)
ZLIB_PREFIX = "zlib+base64:"



@dataclass(frozen=True)
class ExportHeader:
    """The parsed ``dacnn.*`` metadata of a compact export."""

    dtype: str
    model: str
    model_kwargs: dict[str, Any]
    vectors: list[tuple[str, tuple[int, ...]]]
    quantized: list[str]
    aliases: dict[str, str]
    shared: list[tuple[str, int, int]]  # (name, uses, numel)
    params: dict[str, int]
    meta: dict[str, Any] = field(default_factory=dict)


def _unpack_json(text: str) -> Any:
    if text.startswith(ZLIB_PREFIX):
        text = zlib.decompress(base64.b64decode(text[len(ZLIB_PREFIX) :])).decode()
    return json.loads(text)


def _read_raw(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def is_compact_export(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`export_safetensors`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("dacnn.format") == FORMAT
    except Exception:
        return False


def parse_header(metadata: dict[str, str], path: Path) -> ExportHeader:
    """Parse and check the ``dacnn.*`` metadata; a bad field raises :class:`CheckpointError`."""
    if metadata.get("dacnn.format") != FORMAT:
        found = metadata.get("dacnn.format", "none")
        raise CheckpointError(f"{path}: not a dacnn compact export (dacnn.format={found!r}, want {FORMAT!r})")

    def field_(key: str, default: str) -> Any:
        try:
            return _unpack_json(metadata.get(key, default))
        except (ValueError, zlib.error) as exc:  # JSONDecodeError and binascii.Error are ValueErrors
            raise CheckpointError(f"{path}: metadata field {key!r} is not valid JSON ({exc})") from exc

    dtype = metadata.get("dacnn.dtype", "")
    if dtype not in DTYPES:
        raise CheckpointError(
            f"{path}: metadata field 'dacnn.dtype' is {dtype!r}, want one of {list(DTYPES)}"
        )
    try:
        return _header(metadata, dtype, field_)
    except (TypeError, ValueError, KeyError) as exc:  # valid JSON of the wrong shape
        raise CheckpointError(f"{path}: malformed dacnn metadata ({type(exc).__name__}: {exc})") from None


def _header(metadata: dict[str, str], dtype: str, field_: Any) -> ExportHeader:
    header = ExportHeader(
        dtype=dtype,
        model=metadata.get("dacnn.model", ""),
        model_kwargs=field_("dacnn.model_kwargs", "{}"),
        vectors=[(k, tuple(shape)) for k, shape in field_("dacnn.vectors", "[]")],
        quantized=list(field_("dacnn.quantized", "[]")),
        aliases=dict(field_("dacnn.aliases", "{}")),
        shared=[tuple(s) for s in field_("dacnn.shared", "[]")],
        params=dict(field_("dacnn.params", "{}")),
        meta=dict(field_("dacnn.meta", "{}")),
    )
    if not isinstance(header.model_kwargs, dict) or not all(isinstance(k, str) for k in header.quantized):
        raise TypeError("model_kwargs must be a mapping and quantized a list of names")
    return header


def read_export(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], ExportHeader]:
    """The float state dict of a compact export (vectors unpacked, int8 dequantised) and its header."""
    path = Path(path)
    raw, metadata = _read_raw(path)
    header = parse_header(metadata, path)
    try:
        return _unpack(raw, header, path), header
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # tensors that do not fit the header
        raise CheckpointError(f"{path}: tensors do not fit the dacnn metadata ({type(exc).__name__}: "
                              f"{exc})") from None


def _unpack(raw: dict[str, torch.Tensor], header: ExportHeader, path: Path) -> dict[str, torch.Tensor]:
    pack = raw.pop(VECTORS, torch.empty(0))
    sizes = [int(torch.Size(shape).numel()) for _, shape in header.vectors]
    if sum(sizes) != pack.numel():
        raise CheckpointError(
            f"{path}: {VECTORS} holds {pack.numel()} values but its index lists {sum(sizes)}"
        )
    for (key, shape), part in zip(header.vectors, torch.split(pack, sizes)):
        raw[key] = part.reshape(shape)
    missing = [key for key in header.quantized if key not in raw]
    scales = raw.pop(SCALES, torch.empty(0))
    channels = [raw[key].shape[0] for key in header.quantized if key in raw]
    if missing or sum(channels) != scales.numel():
        raise CheckpointError(f"{path}: quantised tensors {missing} missing or {SCALES} does not fit them")
    for key, scale in zip(header.quantized, torch.split(scales, channels)):
        raw[key] = dequantize_per_channel(raw[key], scale)
    return raw


def load_state_into(
    model: nn.Module, state: dict[str, torch.Tensor], aliases: dict[str, str], *, source: object = ""
) -> None:
    """Copy ``state`` into ``model`` (copy mode, so tying survives); names must match exactly.

    Missing keys are allowed only for aliases of stored tensors and training counters.
    """
    state = ckpt.upgrade_state(model, state)  # a file written under a family's older names
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: tensors do not fit the model ({exc})") from exc
    missing = [
        k for k in result.missing_keys if k not in aliases and k.rsplit(".", 1)[-1] not in TRAINING_ONLY
    ]
    unexpected = result.unexpected_keys
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def load_exported(
    path: str | os.PathLike[str], model: nn.Module | None = None, *, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, ExportHeader]:
    """Rebuild (or fill ``model``) from a compact export; returns an eval-mode float model.

    int8 weights are dequantised, fp16 ones upcast to ``dtype``. Shared kernels stay single tensors.
    """
    state, header = read_export(path)
    if model is None:
        if not header.model:
            raise CheckpointError(f"{path}: no model name recorded; pass the model to load into")
        try:
            with torch.device("meta"):  # shapes first: damaged metadata must not allocate gigabytes
                skeleton = create_model(header.model, **header.model_kwargs)
        except Exception as exc:  # the registry and the model constructors raise many types
            raise CheckpointError(
                f"{path}: cannot build model {header.model!r} with {header.model_kwargs} ({exc})"
            ) from None
        shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        wrong = [k for k, v in state.items() if shapes.get(k) != tuple(v.shape)]
        if wrong:
            raise CheckpointError(f"{path}: tensor {wrong[0]} does not fit model {header.model!r} "
                                  f"with {header.model_kwargs}")
        model = create_model(header.model, **header.model_kwargs)
    load_state_into(model, state, header.aliases, source=path)
    return model.to(dtype).eval(), header
