"""Compress and ship: compact safetensors (fp32/fp16/int8), ONNX, inspection (``dacnn export``).

* :mod:`dacnn.export.compact`: every tensor stored once, metadata to rebuild the model;
* :mod:`dacnn.export.quantize`: per-output-channel symmetric int8, a shared kernel quantised once;
* :mod:`dacnn.export.onnx_export`: one initializer per shared kernel, a BatchNorm node per use;
* :mod:`dacnn.export.inspect`: what a file holds and which tensors are shared.
"""

from dacnn.export.compact import (
    DTYPES,
    FORMAT,
    ExportHeader,
    ExportInfo,
    export_safetensors,
    is_compact_export,
    load_exported,
    read_export,
    unique_state,
)
from dacnn.export.inspect import InspectReport, format_report, inspect_file
from dacnn.export.onnx_export import OnnxReport, export_onnx, max_abs_diff, onnx_sharing_report
from dacnn.export.quantize import dequantize_per_channel, quantize_per_channel

__all__ = [
    "DTYPES",
    "FORMAT",
    "ExportHeader",
    "ExportInfo",
    "InspectReport",
    "OnnxReport",
    "dequantize_per_channel",
    "export_onnx",
    "export_safetensors",
    "format_report",
    "inspect_file",
    "is_compact_export",
    "load_exported",
    "max_abs_diff",
    "onnx_sharing_report",
    "quantize_per_channel",
    "read_export",
    "unique_state",
]
