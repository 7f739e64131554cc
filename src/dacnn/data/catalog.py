"""The dataset catalogue: what each dataset is, where its files are looked for, where they come from.

Data directory (``get_data_dir``): the ``data_dir`` argument / ``--data-dir`` flag, else ``$DACNN_DATA``,
else ``~/.cache/dacnn/data``. Inside it each dataset has its own folder ``<data_dir>/<name>/`` holding
any one of these formats (looked for in this order):

1. WebDataset shards with a manifest: ``MANIFEST.json`` + ``<name>-<split>-NNNNNN.tar[.gz]``
   (``<key>.png|jpg`` + ``<key>.cls``), as written by ``dacnn data convert``;
2. the same shards without a manifest (no checksums to check);
3. the official distribution files, as downloaded by ``dacnn data download NAME``:
   ``cifar10/cifar-10-python.tar.gz`` (or the extracted ``cifar10/cifar-10-batches-py/``),
   ``cifar100/cifar-100-python.tar.gz`` (or ``cifar100/cifar-100-python/``),
   ``svhn/{train,test,extra}_32x32.mat``,
   ``fashion_mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``;
4. an image-folder tree ``<name>/<split>/<class>/<image>``.

Cache directory (``get_cache_dir``): ``$DACNN_CACHE``, else ``~/.cache/dacnn``; decoded arrays live in
``<cache>/decoded/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path("~/.cache/dacnn/data")
DEFAULT_CACHE_DIR = Path("~/.cache/dacnn")


@dataclass(frozen=True)
class OfficialFile:
    """One file of a dataset's official distribution, with the checksum its authors publish."""

    filename: str
    url: str
    md5: str


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset; ``mean``/``std`` are per channel in 0..1 pixel units."""

    name: str
    num_classes: int
    image_size: tuple[int, int, int]  # (H, W, C)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: dict[str, int]  # official split -> number of samples
    classes: tuple[str, ...] | None  # None where the names come from the files (CIFAR-100)
    official_files: tuple[OfficialFile, ...]

    @property
    def channels(self) -> int:
        return self.image_size[2]

    def pad_for(self, model_hw: int | None, pad_to: int | None = None) -> int | None:
        """The side the images are zero-padded to for a model designed for ``model_hw`` pixels: an
        explicit ``pad_to``, else the model's side when it is larger than the images' (Fashion-MNIST's
        28 -> 32 for the CIFAR nets), else none. The one padding rule of training, evaluation and
        the experiments' counts."""
        if pad_to is not None:
            return pad_to
        return model_hw if model_hw and model_hw > self.image_size[0] else None

    def input_size(self, pad_to: int | None = None) -> tuple[int, int, int]:
        """``(C, H, W)`` the images reach a model at: their own size, or padded to ``pad_to``."""
        height, width, chans = self.image_size
        return (chans, pad_to or height, pad_to or width)


_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                    "Bag", "Ankle boot")
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"

DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        {"train": 50000, "test": 10000}, _CIFAR10_CLASSES,
        (OfficialFile("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                      "c58f30108f718f92721af3b95e74349a"),),
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        {"train": 50000, "test": 10000}, None,
        (OfficialFile("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                      "eb9058c3a382ffc7106e4002c42a8d85"),),
    ),
    "svhn": DatasetInfo(
        "svhn", 10, (32, 32, 3), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
        {"train": 73257, "test": 26032, "extra": 531131}, tuple(str(d) for d in range(10)),
        (OfficialFile("train_32x32.mat", _SVHN_URL + "train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
         OfficialFile("test_32x32.mat", _SVHN_URL + "test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3")),
    ),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", 10, (28, 28, 1), (0.2860,), (0.3530,),
        {"train": 60000, "test": 10000}, _FASHION_CLASSES,
        tuple(OfficialFile(f, _FASHION_URL + f, md5) for f, md5 in (
            ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        )),
    ),
}

# The SVHN "extra" split (531,131 images, 1.3 GB) is read when present but not downloaded by default.
SVHN_EXTRA = OfficialFile("extra_32x32.mat", _SVHN_URL + "extra_32x32.mat",
                          "a93ce644f1a588dc4d68dda5feec44a7")


def get_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``data_dir`` if given, else ``$DACNN_DATA``, else ``~/.cache/dacnn/data``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("DACNN_DATA")
    if env:
        return Path(env).expanduser()
    return DEFAULT_DATA_DIR.expanduser()


def data_dir_origin(data_dir: str | os.PathLike[str] | None = None) -> str:
    """Where :func:`get_data_dir` took its answer from (for ``dacnn data list``)."""
    if data_dir is not None and str(data_dir) != "":
        return "--data-dir"
    return "$DACNN_DATA" if os.environ.get("DACNN_DATA") else "default"


def get_cache_dir() -> Path:
    """The cache root: ``$DACNN_CACHE``, else ``~/.cache/dacnn``."""
    env = os.environ.get("DACNN_CACHE")
    return Path(env).expanduser() if env else DEFAULT_CACHE_DIR.expanduser()
