"""Training: ``train(TrainConfig) -> TrainResult``, the papers' recipes, checkpoints, logs, DDP.

``dacnn train`` (``dacnn.cli.train``) is a thin layer over :func:`train`; experiment runners call
it directly::

    from dacnn.train import resolve_config, train
    result = train(resolve_config({"recipe": "demo", "epochs": 1}))
"""

from dacnn.checkpoint import load_model_file
from dacnn.train.config import TrainConfig, config_from_dict, resolve_config
from dacnn.train.loop import TrainingDiverged, TrainResult, train
from dacnn.train.recipes import RECIPES, get_recipe

__all__ = [
    "RECIPES",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "config_from_dict",
    "get_recipe",
    "load_model_file",
    "resolve_config",
    "train",
]
