"""Real data: dataset readers, a decoded-array cache, checks and an in-memory device loader.

>>> split = load_dataset("cifar10", "train")            # DatasetSplit: uint8 NHWC, int64 labels
>>> train, val = split.train_val_split(val_size=5000, seed=0)
>>> loader = DeviceLoader(train, batch_size=256, shuffle=True, drop_last=True,
...                       augment=Augment(crop_padding=4, flip=True))

Data directory: ``data_dir`` / ``--data-dir``, else ``$DACNN_DATA``, else ``~/.cache/dacnn/data``;
layout in :mod:`dacnn.data.catalog`. Cache: ``$DACNN_CACHE``, else ``~/.cache/dacnn``.
"""

from dacnn.data.augment import Augment
from dacnn.data.catalog import DATASETS, DatasetInfo, get_cache_dir, get_data_dir
from dacnn.data.imagefolder import read_image_folder
from dacnn.data.loader import DeviceLoader
from dacnn.data.sources import available_splits, find_source, load_dataset
from dacnn.data.split import DatasetSplit

__all__ = [
    "DATASETS",
    "Augment",
    "DatasetInfo",
    "DatasetSplit",
    "DeviceLoader",
    "available_splits",
    "find_source",
    "get_cache_dir",
    "get_data_dir",
    "load_dataset",
    "read_image_folder",
]
