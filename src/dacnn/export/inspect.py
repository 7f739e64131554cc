"""``dacnn inspect FILE``: what a checkpoint or export holds, and which tensors are shared.

Reads safetensors files (compact exports and training checkpoints) and ONNX graphs. When the model
is recorded (export metadata, or the checkpoint's sidecar read by
:func:`dacnn.checkpoint.read_sidecar`) it is rebuilt with
:func:`dacnn.create_model` and :func:`dacnn.counting.parameter_uses` says how often each tensor is
applied; otherwise the uses recorded at export time are shown.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dacnn.checkpoint import read_sidecar
from dacnn.compact_format import FORMAT, SCALE_SUFFIX, SCALES, VECTORS, parse_header
from dacnn.counting import count_params, parameter_uses
from dacnn.errors import CheckpointError
from dacnn.registry import create_model

__all__ = ["TensorRow", "InspectReport", "inspect_file", "format_report"]

ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


@dataclass(frozen=True)
class TensorRow:
    """One stored tensor: name, shape, dtype, bytes and (when known) how many layers use it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    uses: int | None = None
    note: str = ""


@dataclass
class InspectReport:
    path: Path
    kind: str
    file_bytes: int
    rows: list[TensorRow]
    model: str = ""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    unique_params: int | None = None
    per_use_params: int | None = None

    @property
    def shared(self) -> list[TensorRow]:
        return [r for r in self.rows if r.uses is not None and r.uses > 1]

    @property
    def data_bytes(self) -> int:
        return sum(r.bytes for r in self.rows)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _checkpoint_description(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Model name, kwargs and other fields of a training weights file's sidecar, if it has one."""

    try:
        side = read_sidecar(path)
    except CheckpointError as exc:
        return "", {}, {"note": f"model unknown: {exc}"}
    meta = {k: v for k, v in side.items() if k not in ("model", "model_kwargs", "format")}
    return str(side["model"]), dict(side["model_kwargs"]), meta


def _safetensors_rows(path: Path) -> tuple[list[TensorRow], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            rows = []
            for key in f.keys():
                piece = f.get_slice(key)
                shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
                rows.append(TensorRow(key, shape, dtype, _numel(shape) * ITEMSIZE.get(dtype, 0)))
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    return rows, metadata


def _unpack_vector_rows(rows: list[TensorRow], metadata: dict[str, str], path: Path) -> list[TensorRow]:
    """Replace the ``__vectors__`` and ``__scales__`` rows of a compact export by a row per vector."""
    header = parse_header(metadata, path)
    by_name = {r.name: r for r in rows}
    out = [
        TensorRow(
            r.name, r.shape, r.dtype, r.bytes, note="int8 per-channel" if r.name in header.quantized else ""
        )
        for r in rows
        if r.name not in (VECTORS, SCALES)
    ]
    if SCALES in by_name:
        itemsize = ITEMSIZE.get(by_name[SCALES].dtype, 0)
        for key in header.quantized:
            channels = by_name[key].shape[0]
            out.append(
                TensorRow(
                    key + SCALE_SUFFIX, (channels,), by_name[SCALES].dtype, channels * itemsize, note="scales"
                )
            )
    if VECTORS in by_name:
        itemsize = ITEMSIZE.get(by_name[VECTORS].dtype, 0)
        for key, shape in header.vectors:
            out.append(TensorRow(key, shape, by_name[VECTORS].dtype, _numel(shape) * itemsize, note="packed"))
    return out


def _onnx_rows(path: Path) -> list[TensorRow]:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise CheckpointError(
            "reading ONNX files needs the optional extra: pip install 'dacnn[onnx]'"
        ) from exc
    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable ONNX file ({exc})") from exc
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    rows = []
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        uses = consumers.get(init.name, 0)
        rows.append(TensorRow(init.name, tuple(array.shape), str(array.dtype), int(array.nbytes), uses))
    return rows


def _annotate_uses(report: InspectReport, recorded_shared: list[tuple[str, int, int]]) -> None:
    """Fill ``uses`` from the rebuilt model, else from the uses recorded at export."""
    uses: dict[str, int] = {}
    if report.model:
        try:
            model = create_model(report.model, **report.model_kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            report.meta.setdefault("note", f"model not rebuilt: {exc}")
        else:
            uses = {name: n for name, _, n in parameter_uses(model).values()}
            counts = count_params(model)
            report.unique_params, report.per_use_params = counts.unique, counts.per_use
    if not uses:
        uses = {name: n for name, n, _ in recorded_shared}
    report.rows = [
        TensorRow(
            r.name,
            r.shape,
            r.dtype,
            r.bytes,
            None if r.note == "scales" or not uses else uses.get(r.name, 1),
            r.note,
        )
        for r in report.rows
    ]


def inspect_file(path: str | os.PathLike[str]) -> InspectReport:
    """Describe a ``.safetensors`` (compact export or checkpoint) or ``.onnx`` file.

    For ONNX, a tensor's uses are the graph nodes that read the initializer.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".onnx":
        return InspectReport(path, "ONNX graph (initializers)", path.stat().st_size, _onnx_rows(path))
    rows, metadata = _safetensors_rows(path)
    recorded: list[tuple[str, int, int]] = []
    meta: dict[str, Any] = {}
    if metadata.get("dacnn.format") == FORMAT:
        header = parse_header(metadata, path)
        kind = f"dacnn compact export ({header.dtype})"
        try:
            rows = _unpack_vector_rows(rows, metadata, path)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"{path}: tensors do not fit the dacnn metadata ({type(exc).__name__}: "
                                  f"{exc})") from None
        name, kwargs, recorded, meta = header.model, header.model_kwargs, header.shared, dict(header.meta)
    else:
        kind = "safetensors"
        name, kwargs, meta = _checkpoint_description(path)
    report = InspectReport(path, kind, path.stat().st_size, rows, name, kwargs, meta)
    _annotate_uses(report, recorded)
    return report


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def format_report(report: InspectReport) -> str:
    """Human-readable listing: header lines, one row per tensor, totals."""
    lines = [f"file:   {report.path}  ({report.kind}, {report.file_bytes:,} bytes)"]
    if report.model:
        lines.append(f"model:  {report.model} {json.dumps(report.model_kwargs)}")
    if report.meta:
        lines.append("meta:   " + ", ".join(f"{k}={v}" for k, v in report.meta.items()))
    if report.unique_params is not None:
        lines.append(f"params: {report.unique_params:,} unique, {report.per_use_params:,} counting every use")
    width = max([len(r.name) for r in report.rows] + [4])
    lines.append(f"{'name':<{width}}  {'shape':<14} {'dtype':<7} {'bytes':>10}  uses")
    for r in report.rows:
        uses = "-" if r.uses is None else (f"{r.uses} (shared)" if r.uses > 1 else str(r.uses))
        note = f"  [{r.note}]" if r.note else ""
        lines.append(
            f"{r.name:<{width}}  {_fmt_shape(r.shape):<14} {r.dtype:<7} {r.bytes:>10,}  {uses}{note}"
        )
    shared = report.shared
    lines.append(
        f"tensors: {len(report.rows)}, shared: {len(shared)}"
        + "".join(f"; {r.name} used {r.uses}x" for r in shared)
    )
    lines.append(
        f"bytes: {report.data_bytes:,} tensor data + {report.file_bytes - report.data_bytes:,} header/other"
        f" = {report.file_bytes:,}"
    )
    return "\n".join(lines)
