"""dacnn: convolutional networks that share weights across layers.

DACNN (arXiv 1904.09764), inter-layer kernel sharing (arXiv 2210.14151), LruNet (arXiv 1901.09615)
and ShaResNet (arXiv 1702.08782) on one sharing core (:mod:`dacnn.shared_kernel`,
:mod:`dacnn.tying`). Importing the package registers every model family (:mod:`dacnn.models`).
"""

from dacnn import models  # noqa: F401  (registers every model family)
from dacnn.counting import ParamCount, count_flops, count_params
from dacnn.hf_hub import from_pretrained
from dacnn.registry import (
    ModelInfo,
    PretrainedCfg,
    create_model,
    list_models,
    list_pretrained,
    model_info,
    register_model,
)
from dacnn.shared_kernel import AnchoredConv2d, SharedKernel
from dacnn.tying import share_kernels, untie

__version__ = "0.1.0"

__all__ = [
    "AnchoredConv2d",
    "ModelInfo",
    "ParamCount",
    "PretrainedCfg",
    "SharedKernel",
    "count_flops",
    "count_params",
    "create_model",
    "from_pretrained",
    "list_models",
    "list_pretrained",
    "model_info",
    "register_model",
    "share_kernels",
    "untie",
]
