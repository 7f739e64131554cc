"""Decode once: decoded arrays are stored under ``<cache dir>/decoded/`` keyed by their source files.

The key hashes, for every source file, its resolved path (so the data directory) and the sha256
of its whole content (tens of milliseconds for a 30 MB shard): a file changed in any byte, even
with the same size and modification time, misses the cache and is decoded (and checked) again.
Writes are atomic (temporary file + rename), so an interrupted run never leaves a half-written
entry behind.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from dacnn.data.catalog import get_cache_dir
from dacnn.fileio import atomic_write, sha256_file

CACHE_FORMAT = 2


def cache_key(tag: list[str], files: list[Path]) -> str:
    """A hex key for the data decoded from ``files``: their locations and contents."""
    entries = [[str(path.resolve()), sha256_file(path)] for path in files]
    blob = json.dumps([CACHE_FORMAT, tag, entries], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def cache_path(stem: str, key: str) -> Path:
    return get_cache_dir() / "decoded" / f"{stem}-{key[:20]}.npz"


def load_cached(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """The cached ``(images, labels, classes)``, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["images"], npz["labels"], [str(c) for c in npz["classes"]]
    except (OSError, ValueError, KeyError):
        return None


def store_cached(path: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    """Write an entry atomically and drop older entries of the same stem. Failures are not fatal."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, images=images, labels=labels, classes=np.asarray(classes, dtype=np.str_))

        atomic_write(path, write)
        stem = path.name.rsplit("-", 1)[0]
        for old in path.parent.glob(f"{stem}-*.npz"):
            if old != path and old.name.rsplit("-", 1)[0] == stem:
                old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only or full cache directory only costs a re-decode next time
