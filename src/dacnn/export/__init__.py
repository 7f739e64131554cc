"""Compress and ship: compact safetensors (fp32/fp16/int8), ONNX, inspection (``dacnn export``).

Export only writes; reading any of these files back is loading (:mod:`dacnn.loading`,
:mod:`dacnn.compact_format`).

* :mod:`dacnn.export.compact`: every tensor stored once, metadata to rebuild the model (int8 through
  :mod:`dacnn.quantize`: per output channel, a shared kernel quantised once);
* :mod:`dacnn.export.onnx_export`: one initializer per shared kernel, a BatchNorm node per use;
* :mod:`dacnn.export.inspect`: what a file holds and which tensors are shared.
"""

from dacnn.export.compact import ExportInfo, export_safetensors, unique_state
from dacnn.export.inspect import InspectReport, format_report, inspect_file
from dacnn.export.onnx_export import OnnxReport, export_onnx, max_abs_diff, onnx_sharing_report

__all__ = ["ExportInfo", "InspectReport", "OnnxReport", "export_onnx", "export_safetensors", "format_report",
           "inspect_file", "max_abs_diff", "onnx_sharing_report", "unique_state"]
