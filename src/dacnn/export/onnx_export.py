"""ONNX export (``dacnn export --format onnx``, optional extra ``dacnn[onnx]``).

The TorchScript exporter (``dynamo=False``, fast) is used **without constant folding**: in eval
mode, folding fuses each Conv with the BatchNorm after it, which for a shared kernel with a
BatchNorm per use writes one folded copy of the kernel per use (DACNN-14 at width 32: 28
initializers and 457 kB instead of 56 and 62 kB, ``../shared/reference/PITFALLS.md`` items 5 and
10). Without folding every shared kernel is one initializer used by several ``Conv`` nodes, and each
use keeps its own ``BatchNormalization`` node. :func:`onnx_sharing_report` checks both after export;
:func:`max_abs_diff` compares onnxruntime with PyTorch.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
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


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    input_size: tuple[int, ...] | None = None,
    opset: int = OPSET,
) -> OnnxReport:
    """Export ``model`` (eval mode, float32, dynamic batch) to ONNX and check the sharing survived.

    Raises :class:`CheckpointError` if a shared kernel ends up stored more than once.
    """
    _require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    example = torch.zeros(1, *_input_size(model, input_size))
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
    report = onnx_sharing_report(path, model)
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
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})
        return torch.from_numpy(out)


def max_abs_diff(path: str | os.PathLike[str], model: nn.Module, inputs: torch.Tensor) -> float:
    """Largest ``|onnxruntime(inputs) - model(inputs)|`` (eval mode, float32)."""
    with torch.no_grad():
        ours = OnnxRuntimeModel(path)(inputs)
        reference = model.float().eval()(inputs.float())
    return float((ours - reference).abs().max())
