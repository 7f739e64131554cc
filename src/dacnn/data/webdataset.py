"""WebDataset shards: ``<name>-<split>-NNNNNN.tar[.gz]`` holding ``<key>.png|jpg`` + ``<key>.cls``.

A dataset folder may hold a ``MANIFEST.json`` (the layout ``dacnn data convert`` writes: per-shard sha256,
bytes and sample counts, per-class counts, class names, image shape and mode) and ``classes.txt``.
Shards are decoded in parallel worker processes when there are several of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import re
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from dacnn.data.tar_io import read_archive_bytes, read_file_bytes, tar_members
from dacnn.errors import DataError

IMAGE_EXTS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
T = TypeVar("T")
_SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.(?:tar|tar\.gz|tgz)$")


@dataclass(frozen=True)
class ShardRef:
    """One shard file and what the manifest says about it (None where there is no manifest)."""

    path: Path
    sha256: str | None = None
    num_samples: int | None = None
    num_bytes: int | None = None


@dataclass
class ShardData:
    images: np.ndarray  # uint8 (n, H, W, C)
    labels: np.ndarray  # int64 (n,)
    keys: list[str]


def read_manifest(ds_dir: Path) -> dict | None:
    """The folder's MANIFEST.json as a dict, or None when there is none."""
    path = ds_dir / "MANIFEST.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read manifest: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{path}: manifest has no 'splits' table")
    return manifest


def manifest_image_shape(manifest: dict) -> tuple[int, int, int] | None:
    shape = manifest.get("image_shape")
    if not shape:
        return None
    return (int(shape[0]), int(shape[1]), int(shape[2]) if len(shape) > 2 else 1)


def read_classes_txt(ds_dir: Path) -> list[str] | None:
    path = ds_dir / "classes.txt"
    if not path.is_file():
        return None
    return [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]


def find_shards(ds_dir: Path, split: str, manifest: dict | None) -> list[ShardRef]:
    """The split's shards, from the manifest when there is one, else by file name (sorted)."""
    if manifest is not None:
        entry = manifest["splits"].get(split)
        if entry is None:
            return []
        refs = []
        for shard in entry.get("shards", []):
            try:
                refs.append(ShardRef(ds_dir / shard["file"], shard.get("sha256"), shard.get("num_samples"),
                                     shard.get("bytes")))
            except (KeyError, TypeError) as exc:
                raise DataError(f"{ds_dir / 'MANIFEST.json'}: bad shard entry {shard!r}") from exc
        return refs
    found = []
    if ds_dir.is_dir():
        for path in ds_dir.iterdir():
            match = _SHARD_RE.match(path.name)
            if match and match["split"] == split:
                found.append(path)
    return [ShardRef(p) for p in sorted(found)]


def shard_splits(ds_dir: Path) -> list[str]:
    """Splits that have shard files in ``ds_dir`` (by file name)."""
    if not ds_dir.is_dir():
        return []
    return sorted({m["split"] for p in ds_dir.iterdir() if (m := _SHARD_RE.match(p.name))})


def _decode_image(payload: memoryview, fmt: str, channels: int, path: Path, member: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(payload), formats=(fmt,)) as im:
            want = "L" if channels == 1 else "RGB"
            if im.mode != want:
                im = im.convert(want)
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(_undecodable(path, member, fmt, exc)) from None
    return arr


def _undecodable(path: Path, member: str, fmt: str, exc: Exception) -> str:
    """Name the shard and the sample key; PIL's text names an in-memory buffer, not the file."""
    key = member.rsplit(".", 1)[0]
    reason = f"not a readable {fmt} image" if isinstance(exc, UnidentifiedImageError) else str(exc)
    reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image", reason)
    return f"{path}: sample {key!r} ({member}) does not decode: {reason}"


def _probe_shape(payload: memoryview, fmt: str, member: str, path: Path) -> tuple[int, int, int]:
    """(H, W, C) of one image: greyscale modes give C=1, everything else is read as RGB."""
    try:
        with Image.open(io.BytesIO(payload), formats=(fmt,)) as im:
            return im.height, im.width, 1 if im.mode in ("1", "L", "I", "I;16", "F") else 3
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(_undecodable(path, member, fmt, exc)) from None


def decode_shard(ref: ShardRef, image_shape: tuple[int, int, int] | None = None,
                 num_classes: int | None = None, check_sha256: bool = True) -> ShardData:
    """Decode one shard: every sample needs an image and a ``.cls``; checks sha256, size and labels.

    ``image_shape`` (H, W, C) fixes the expected size and channel count (else the first image sets
    them); ``num_classes`` bounds the labels. Any problem raises DataError naming the shard.
    """
    path = ref.path
    raw = read_file_bytes(path)
    if check_sha256 and ref.sha256:
        got = hashlib.sha256(raw).hexdigest()
        if got != ref.sha256:
            raise DataError(f"{path}: sha256 mismatch (manifest {ref.sha256[:16]}..., file {got[:16]}...)")
    members = tar_members(read_archive_bytes(path, raw), path)
    images: dict[str, tuple[memoryview, str, str]] = {}
    labels: dict[str, int] = {}
    for name, payload in members:
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        if dot < 0:
            continue
        key, ext = name[:dot], name[dot + 1:].lower()
        if ext == "cls":
            text = bytes(payload).decode("ascii", "replace").strip()
            try:
                labels[key] = int(text)
            except ValueError as exc:
                raise DataError(f"{path}: {name} holds {text[:20]!r}, not a class index") from exc
        elif ext in IMAGE_EXTS:
            images[key] = (payload, IMAGE_EXTS[ext], name)
    keys = [k for k in images if k in labels]
    missing = [k for k in images if k not in labels] + [k for k in labels if k not in images]
    if missing:
        raise DataError(f"{path}: sample {missing[0]} lacks its image or .cls ({len(missing)} incomplete)")
    if not keys:
        raise DataError(f"{path}: no samples (no <key>.png|jpg + <key>.cls pairs)")
    if ref.num_samples is not None and len(keys) != ref.num_samples:
        raise DataError(f"{path}: {len(keys)} samples, manifest says {ref.num_samples}")
    label_arr = np.fromiter((labels[k] for k in keys), dtype=np.int64, count=len(keys))
    if num_classes is not None:
        bad = np.flatnonzero((label_arr < 0) | (label_arr >= num_classes))
        if bad.size:
            raise DataError(f"{path}: label {label_arr[bad[0]]} of sample {keys[bad[0]]} out of range "
                            f"[0, {num_classes})")
    if image_shape is None:
        image_shape = _probe_shape(*images[keys[0]], path)
    height, width, channels = image_shape
    out = np.empty((len(keys), height, width, channels), dtype=np.uint8)
    view = out.reshape(len(keys), height, width) if channels == 1 else out
    for i, key in enumerate(keys):
        payload, fmt, member = images[key]
        arr = _decode_image(payload, fmt, channels, path, member)
        if arr.shape != view.shape[1:]:
            raise DataError(f"{path}: image {member} is {arr.shape}, expected {view.shape[1:]}")
        view[i] = arr
    return ShardData(out, label_arr, keys)


def _worker_count(refs: list[ShardRef], workers: int | None) -> int:
    if workers is None:
        env = os.environ.get("DACNN_DATA_WORKERS")
        workers = int(env) if env else min(2, os.cpu_count() or 1)
    if "fork" not in mp.get_all_start_methods():
        return 1
    total = sum(ref.path.stat().st_size for ref in refs if ref.path.is_file())
    return 1 if len(refs) < 2 or total < (4 << 20) else max(1, min(workers, len(refs)))


def map_shards(fn: Callable[..., T], refs: list[ShardRef], *args: object,
               workers: int | None = None) -> list[T]:
    """``[fn(ref, *args) for ref in refs]``, in up to ``workers`` forked processes when that pays."""
    n_workers = _worker_count(refs, workers)
    if n_workers <= 1:
        return [fn(ref, *args) for ref in refs]
    with ProcessPoolExecutor(n_workers, mp_context=mp.get_context("fork")) as pool:
        futures = [pool.submit(fn, ref, *args) for ref in refs]
        return [f.result() for f in futures]


def decode_shards(refs: list[ShardRef], image_shape: tuple[int, int, int] | None = None,
                  num_classes: int | None = None, workers: int | None = None) -> list[ShardData]:
    """Decode several shards, in ``workers`` forked processes when that pays (default: up to 2)."""
    return map_shards(decode_shard, refs, image_shape, num_classes, workers=workers)
