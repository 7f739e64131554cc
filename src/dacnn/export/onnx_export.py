"""ONNX export (``dacnn export --format onnx``, optional extra ``dacnn[onnx]``).

The TorchScript exporter (``dynamo=False``, fast) is used **without constant folding**: in eval
mode, folding fuses each Conv with the BatchNorm after it, which for a shared kernel with a
BatchNorm per use writes one folded copy of the kernel per use (DACNN-14 at width 32: 28
initializers and 457 kB instead of 56 and 62 kB, ``docs/reference/PITFALLS.md`` items 5 and
10). Without folding every shared kernel is one initializer used by several ``Conv`` nodes, and each
use keeps its own ``BatchNormalization`` node. :func:`onnx_sharing_report` checks both after export;
:func:`max_abs_diff` compares onnxruntime with PyTorch. A model whose forward bakes the batch size
into the traced graph (``x.reshape(x.shape[0], ...)``) is exported again with the dynamo exporter
(symbolic batch, no graph optimisation, node stack traces stripped).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dacnn.counting import parameter_uses
from dacnn.errors import CheckpointError, ConfigError

__all__ = ["OnnxReport", "OnnxRuntimeModel", "export_onnx", "onnx_sharing_report", "max_abs_diff"]

OPSET = 17


@dataclass(frozen=True)
class OnnxReport:
    """Initializers of an exported graph and how the model's shared tensors appear in it."""

    path: Path
    file_bytes: int
    initializers: int
    initializer_values: int
    shared_copies: dict[str, int]  # shared tensor name -> initializers holding exactly its values
    conv_nodes: int
    batchnorm_nodes: int
    exporter: str = ""  # "torchscript" or "dynamo" (see export_onnx)

    @property
    def shared_stored_once(self) -> bool:
        return all(n == 1 for n in self.shared_copies.values())


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise ConfigError("ONNX export needs the optional extra: pip install 'dacnn[onnx]'") from exc


def _input_size(model: nn.Module, input_size: tuple[int, ...] | None) -> tuple[int, ...]:
    if input_size is not None:
        return tuple(input_size)
    info = getattr(model, "info", None)
    if info is None:
        raise ConfigError("input size unknown: pass input_size=(C, H, W) for a model without .info")
    return tuple(info.input_size)


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            do_constant_folding=False,  # folding fuses Conv+BN per use: one kernel copy per use
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """torch.export-based exporter: the batch size stays symbolic even where the tracer sees an int."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            optimize=False,
            opset_version=max(opset, 18),
            dynamic_shapes=({0: batch},),
            input_names=["input"],
            output_names=["logits"],
            verbose=False,
        )
        program.save(str(path))
    registration.setLevel(level)
    import onnx

    graph_model = onnx.load(str(path))
    for node in graph_model.graph.node:  # stack traces and FX names: a third of the file, local paths
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(graph_model, str(path))


def _runs_at_batch(path: Path, example: torch.Tensor, batch: int) -> bool:
    try:
        return OnnxRuntimeModel(path)(example.expand(batch, *example.shape[1:])).shape[0] == batch
    except Exception:  # onnxruntime raises its own types for shape errors
        return False


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    input_size: tuple[int, ...] | None = None,
    opset: int = OPSET,
) -> OnnxReport:
    """Export ``model`` (eval mode, float32, dynamic batch) to ONNX and check the sharing survived.

    The TorchScript exporter runs first; if its graph has the example's batch size baked in (a
    forward doing ``x.reshape(x.shape[0], ...)`` is traced as a constant), the dynamo exporter
    (``torch.export``, symbolic batch, no graph optimisation so no BN folding) replaces it.
    Raises :class:`CheckpointError` if a shared kernel ends up stored more than once.
    """
    _require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    example = torch.zeros(1, *_input_size(model, input_size))
    _export_torchscript(model, example, path, opset)
    exporter = "torchscript"
    if not _runs_at_batch(path, example, 2):
        _export_dynamo(model, example.expand(2, *example.shape[1:]).contiguous(), path, opset)
        exporter = "dynamo"
        if not _runs_at_batch(path, example, 3):
            raise CheckpointError(f"{path}: neither ONNX exporter gave a graph with a dynamic batch size")
    report = replace(onnx_sharing_report(path, model), exporter=exporter)
    if not report.shared_stored_once:
        raise CheckpointError(f"{path}: a shared kernel was duplicated in the graph: {report.shared_copies}")
    return report


def onnx_sharing_report(path: str | os.PathLike[str], model: nn.Module) -> OnnxReport:
    """Count initializers and, for every tensor ``model`` uses more than once, the copies in ``path``."""
    _require_onnx()
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = [numpy_helper.to_array(init) for init in graph.initializer]
    copies: dict[str, int] = {}
    for name, param, uses in parameter_uses(model).values():
        if uses > 1:
            value = param.detach().cpu().float().numpy()
            copies[name] = sum(a.shape == value.shape and np.array_equal(a, value) for a in arrays)
    ops = [node.op_type for node in graph.node]
    return OnnxReport(
        path=Path(path),
        file_bytes=Path(path).stat().st_size,
        initializers=len(arrays),
        initializer_values=sum(int(a.size) for a in arrays),
        shared_copies=copies,
        conv_nodes=ops.count("Conv"),
        batchnorm_nodes=ops.count("BatchNormalization"),
    )


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by onnxruntime behind the ``nn.Module`` call interface (CPU, float32), so
    the training engine's ``evaluate`` can score it like the PyTorch model."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ConfigError("running an ONNX file needs onnxruntime: pip install 'dacnn[onnx]'") from exc
        options = ort.SessionOptions()
        options.log_severity_level = 4  # failures raise; do not also log them
        self.path = path
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
        except Exception as exc:  # onnxruntime's own error types: not a model, invalid graph...
            raise CheckpointError(f"{path}: onnxruntime cannot load it ({_first_line(exc)})") from None
        self.run_options = ort.RunOptions()
        self.run_options.log_severity_level = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: x.detach().float().cpu().contiguous().numpy()}
        try:
            outputs = self.session.run(None, feed, self.run_options)
        except Exception as exc:  # a graph that loads but cannot run on this input
            raise CheckpointError(f"{self.path}: onnxruntime cannot run it ({_first_line(exc)})") from None
        if len(outputs) != 1:
            raise CheckpointError(f"{self.path}: the graph has {len(outputs)} outputs, expected 1 (logits)")
        return torch.from_numpy(outputs[0])


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def max_abs_diff(path: str | os.PathLike[str], model: nn.Module, inputs: torch.Tensor) -> float:
    """Largest ``|onnxruntime(inputs) - model(inputs)|`` (eval mode, float32)."""
    with torch.no_grad():
        ours = OnnxRuntimeModel(path)(inputs)
        reference = model.float().eval()(inputs.float())
    return float((ours - reference).abs().max())
