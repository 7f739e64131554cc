"""Small random datasets written in the exact official file formats, for tests and demos.

Each writer returns the arrays it wrote so a reader can be checked against them.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from dacnn.data.official import CIFAR_LAYOUT
from dacnn.data.split import DatasetSplit

Arrays = tuple[np.ndarray, np.ndarray]


def random_split(name: str = "toy", split: str = "train", n: int = 64,
                 shape: tuple[int, int, int] = (32, 32, 3),
                 num_classes: int = 10, seed: int = 0) -> DatasetSplit:
    """A DatasetSplit of random pixels with every class present (labels cycle through the classes)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    return DatasetSplit(name, split, images, labels, [f"class{i}" for i in range(num_classes)])


def _tar_add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_cifar(ds_dir: Path, name: str = "cifar10", n_train: int = 20, n_test: int = 10, seed: int = 0,
                extracted: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` (or the extracted folder) in ``ds_dir``.

    Batches are pickled dicts with bytes keys as in the official (Python 2) files: ``data`` uint8
    (N, 3072) in CHW order, ``labels`` (CIFAR-10) or ``fine_labels`` + ``coarse_labels``. Returns
    split -> (images NHWC, labels or fine labels, coarse labels or None).
    """
    archive, folder, batches, meta_name = CIFAR_LAYOUT[name]
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    result = {}
    n_classes = 10 if name == "cifar10" else 100
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, n_classes, size=n)
        coarse = labels // 5 if name == "cifar100" else None
        result[split] = (images, labels.astype(np.int64), None if coarse is None else coarse.astype(np.int64))
        parts = np.array_split(np.arange(n), len(batches[split]))
        for member, idx in zip(batches[split], parts, strict=True):
            batch = {b"batch_label": member.encode(),
                     b"data": images[idx].transpose(0, 3, 1, 2).reshape(len(idx), 3072),
                     b"filenames": [f"img_{i}.png".encode() for i in idx]}
            if coarse is None:
                batch[b"labels"] = [int(v) for v in labels[idx]]
            else:
                batch[b"fine_labels"] = [int(v) for v in labels[idx]]
                batch[b"coarse_labels"] = [int(v) for v in coarse[idx]]
            files[member] = pickle.dumps(batch, protocol=2)
    if name == "cifar10":
        meta = {b"label_names": [c.encode() for c in ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                                      "frog", "horse", "ship", "truck")],
                b"num_cases_per_batch": 10000, b"num_vis": 3072}
    else:
        meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    files[meta_name] = pickle.dumps(meta, protocol=2)
    ds_dir.mkdir(parents=True, exist_ok=True)
    if extracted:
        (ds_dir / folder).mkdir(exist_ok=True)
        for member, payload in files.items():
            (ds_dir / folder / member).write_bytes(payload)
    else:
        with tarfile.open(ds_dir / archive, "w:gz") as tar:
            for member, payload in files.items():
                _tar_add(tar, f"{folder}/{member}", payload)
    return result


def write_svhn(ds_dir: Path, split: str = "train", n: int = 20, seed: int = 0) -> Arrays:
    """``<split>_32x32.mat`` (X (32, 32, 3, N) uint8, y (N, 1) in 1..10); returns (images NHWC, digits)."""
    import scipy.io

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    digits = np.arange(n) % 10
    ds_dir.mkdir(parents=True, exist_ok=True)
    y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
    scipy.io.savemat(ds_dir / f"{split}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": y})
    return images, digits.astype(np.int64)


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: magic 0x0000 08 <ndim>, big-endian dims, raw data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fashion_mnist(ds_dir: Path, split: str = "train", n: int = 20, seed: int = 0,
                        gz: bool = True, learnable: bool = False) -> Arrays:
    """``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; returns (images (N,28,28,1), labels).

    Pixels are uniform noise; with ``learnable`` class ``c``'s pixels scatter (+-24) around the
    brightness ``24 + 23 c`` instead, a cue that survives crops, flips and rotations, so a small
    net trained on it ends far above chance (tests that learn run on it when the real data is absent).
    """
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    if learnable:
        noise = rng.integers(-24, 25, size=(n, 28, 28))
        images = (24 + 23 * labels.astype(np.int64)[:, None, None] + noise).astype(np.uint8)
    else:
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    ds_dir.mkdir(parents=True, exist_ok=True)
    for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        payload = idx_bytes(arr)
        if gz:
            (ds_dir / (stem + ".gz")).write_bytes(gzip.compress(payload))
        else:
            (ds_dir / stem).write_bytes(payload)
    return images[..., None], labels.astype(np.int64)


def write_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fish"), per_class: int = 3,
                       size: tuple[int, int] = (12, 10), mode: str = "RGB", fmt: str = "png",
                       seed: int = 0) -> Arrays:
    """``root/<class>/<i>.<fmt>`` images; returns (images (N,H,W,C), labels) in the reader's order."""
    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    images, labels = [], []
    for index, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size[0], size[1], channels), dtype=np.uint8)
            Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode).save(root / cls / f"{i:03d}.{fmt}")
            images.append(arr)
            labels.append(index)
    return np.stack(images), np.asarray(labels, dtype=np.int64)
