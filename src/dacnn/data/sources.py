"""Find a dataset's files in the data directory, whatever their format, and load a split from them."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dacnn.data import cache as decoded_cache
from dacnn.data.catalog import DATASETS, get_data_dir
from dacnn.data.imagefolder import FOLDER_IMAGE_EXTS, is_image_folder, read_image_folder
from dacnn.data.official import (
    CIFAR_LAYOUT,
    SVHN_SPLITS,
    cifar_source,
    idx_source,
    read_cifar,
    read_fashion_mnist,
    read_svhn,
    svhn_source,
)
from dacnn.data.split import DatasetSplit
from dacnn.data.webdataset import (
    decode_shards,
    find_shards,
    manifest_image_shape,
    read_classes_txt,
    read_manifest,
    shard_splits,
)
from dacnn.errors import DataError

Arrays = tuple[np.ndarray, np.ndarray, list[str]]


@dataclass
class Source:
    """Where one split of a dataset is read from: its format, files and a reader."""

    kind: str  # "shards" | "cifar" | "svhn" | "idx" | "folder"
    location: Path
    files: list[Path]
    read: Callable[[], Arrays] = field(repr=False)
    checksums: list[str | None] | None = None
    has_manifest: bool = False

    @property
    def description(self) -> str:
        if self.kind == "shards":
            exts = sorted({"".join(p.suffixes) for p in self.files})
            return f"shards ({', '.join(exts)}{', manifest' if self.has_manifest else ', no manifest'})"
        return {"cifar": "official python archive", "svhn": "official .mat", "idx": "official IDX",
                "folder": "image folder"}[self.kind]


def _shard_source(ds_dir: Path, name: str, split: str, workers: int | None) -> Source | None:
    manifest = read_manifest(ds_dir)
    refs = find_shards(ds_dir, split, manifest)
    if not refs:
        return None
    info = DATASETS.get(name)
    classes = (manifest or {}).get("classes") or read_classes_txt(ds_dir) or (
        list(info.classes) if info and info.classes else None)
    shape = manifest_image_shape(manifest) if manifest else (info.image_size if info else None)

    def read() -> Arrays:
        parts = decode_shards(refs, shape, len(classes) if classes else None, workers)
        images = np.concatenate([p.images for p in parts]) if len(parts) > 1 else parts[0].images
        labels = np.concatenate([p.labels for p in parts])
        names = classes or [str(i) for i in range(int(labels.max()) + 1)]
        return images, labels, list(names)

    return Source("shards", ds_dir, [r.path for r in refs], read, [r.sha256 for r in refs],
                  manifest is not None)


def _official_source(ds_dir: Path, name: str, split: str, label_kind: str) -> Source | None:
    if name in CIFAR_LAYOUT:
        source = cifar_source(ds_dir, name)
        if source is None or split not in CIFAR_LAYOUT[name][2]:
            return None
        files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
        return Source("cifar", source, files, lambda: read_cifar(source, name, split, label_kind))
    if name == "svhn":
        path = svhn_source(ds_dir, split)
        if path is None:
            return None
        return Source("svhn", path, [path], lambda: (*read_svhn(path), list(DATASETS["svhn"].classes or ())))
    if name == "fashion_mnist":
        pair = idx_source(ds_dir, split)
        if pair is None:
            return None
        classes = list(DATASETS["fashion_mnist"].classes or ())
        return Source("idx", pair[0], list(pair), lambda: (*read_fashion_mnist(*pair), classes))
    return None


def _folder_source(ds_dir: Path, split: str) -> Source | None:
    root = ds_dir / split
    if not is_image_folder(root):
        return None
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_IMAGE_EXTS)
    return Source("folder", root, files, lambda: read_image_folder(root))


def find_source(name: str, split: str, data_dir: str | os.PathLike[str] | None = None,
                label_kind: str = "fine", workers: int | None = None) -> Source | None:
    """The first format found for ``name``/``split``: manifest shards, shards, official files, folder."""
    ds_dir = get_data_dir(data_dir) / name
    return (_shard_source(ds_dir, name, split, workers)
            or _official_source(ds_dir, name, split, label_kind)
            or _folder_source(ds_dir, split))


def available_splits(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Splits of ``name`` present in the data directory, in any format."""
    ds_dir = get_data_dir(data_dir) / name
    found: set[str] = set()
    manifest = read_manifest(ds_dir) if ds_dir.is_dir() else None
    if manifest:
        found.update(manifest["splits"])
    found.update(shard_splits(ds_dir))
    candidates = set(DATASETS[name].splits) if name in DATASETS else set()
    if name in CIFAR_LAYOUT and cifar_source(ds_dir, name) is not None:
        found.update(CIFAR_LAYOUT[name][2])
    found.update(s for s in SVHN_SPLITS if name == "svhn" and svhn_source(ds_dir, s))
    found.update(s for s in candidates if name == "fashion_mnist" and idx_source(ds_dir, s))
    if ds_dir.is_dir():
        found.update(p.name for p in ds_dir.iterdir() if is_image_folder(p))
    return sorted(found)


def load_dataset(name: str, split: str, data_dir: str | os.PathLike[str] | None = None, *,
                 label_kind: str = "fine", cache: bool = True, workers: int | None = None) -> DatasetSplit:
    """Load one split as a :class:`DatasetSplit` (uint8 NHWC images, int64 labels, class names).

    ``data_dir``: argument, else ``$DACNN_DATA``, else ``~/.cache/dacnn/data`` (see
    :mod:`dacnn.data.catalog` for the layout). Decoded arrays are cached under ``$DACNN_CACHE``
    (default ``~/.cache/dacnn``) so a second load skips decoding. ``label_kind="coarse"`` gives
    CIFAR-100's 20 superclasses (official archive only). ``workers``: shard-decoding processes.
    """
    root = get_data_dir(data_dir)
    source = find_source(name, split, root, label_kind, workers)
    if source is None:
        have = available_splits(name, root)
        if have:
            raise DataError(f"{root / name}: no split {split!r} of {name} (found: {', '.join(have)})")
        hint = f"; run 'dacnn data download {name}'" if name in DATASETS else ""
        raise DataError(f"{root / name}: dataset {name!r} not found (looked for shards, official files and "
                        f"an image folder; data dir from --data-dir, $DACNN_DATA or the default{hint})")
    if label_kind != "fine" and source.kind != "cifar":
        raise DataError(f"{source.location}: label kind {label_kind!r} needs the official CIFAR-100 archive")
    missing = [p for p in source.files if not p.exists()]
    if missing:
        raise DataError(f"{missing[0]}: file not found (listed for {name}/{split})")
    stem = f"{name}-{split}" + ("-coarse" if label_kind == "coarse" else "")
    path = None
    if cache:
        key = decoded_cache.cache_key([name, split, label_kind, source.kind], source.files)
        path = decoded_cache.cache_path(stem, key)
        hit = decoded_cache.load_cached(path)
        if hit is not None:
            return DatasetSplit(name, split, *hit, source=str(source.location))
    images, labels, classes = source.read()
    result = DatasetSplit(name, split, images, labels, classes, source=str(source.location))
    if path is not None:
        decoded_cache.store_cached(path, result.images, result.labels, result.classes)
    return result
