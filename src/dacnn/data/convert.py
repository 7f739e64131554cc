"""``dacnn data convert``: official files (or an image folder) -> WebDataset shards + MANIFEST.json.

Output is WebDataset shards with MANIFEST.json files (as the project's data folder holds): per split
``<name>-<split>-NNNNNN.tar.gz`` holding ``<key>.png`` (lossless) + ``<key>.cls``, keys the sample's
zero-padded position; deterministic archives (mtime 0, uid/gid 0, sorted keys); ``classes.txt``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from dacnn.data.catalog import DATASETS, get_data_dir
from dacnn.data.sources import Source, _folder_source, _official_source, available_splits
from dacnn.data.split import DatasetSplit
from dacnn.errors import DataError
from dacnn.fileio import atomic_write, atomic_write_text


def _png(image) -> bytes:  # noqa: ANN001 - uint8 (H, W, C) array
    buf = io.BytesIO()
    mode = "L" if image.shape[2] == 1 else "RGB"
    Image.fromarray(image[:, :, 0] if mode == "L" else image, mode).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(payload), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(payload))


def write_shards(split: DatasetSplit, out_dir: Path, prefix: str, shard_size: int = 10000,
                 compress: bool = True) -> list[dict]:
    """Write ``split`` as shards in ``out_dir``; returns their manifest entries (file, sha256, ...)."""
    if shard_size < 1:
        raise DataError(f"shard size must be >= 1, got {shard_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for shard_index, start in enumerate(range(0, len(split), shard_size)):
        stop = min(start + shard_size, len(split))
        filename = f"{prefix}-{split.split}-{shard_index:06d}.tar" + (".gz" if compress else "")
        def write(tmp: Path, start: int = start, stop: int = stop) -> None:
            with open(tmp, "wb") as raw:
                stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if compress else raw
                with tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                    for i in range(start, stop):
                        _add(tar, f"{i:06d}.png", _png(split.images[i]))
                        _add(tar, f"{i:06d}.cls", str(int(split.labels[i])).encode("ascii"))
                if compress:
                    stream.close()

        atomic_write(out_dir / filename, write)
        data = (out_dir / filename).read_bytes()
        entries.append({"file": filename, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                        "num_samples": stop - start, "first_key": f"{start:06d}",
                        "last_key": f"{stop - 1:06d}"})
    return entries


def _convertible_source(name: str, split: str, root: Path, label_kind: str) -> Source | None:
    ds_dir = root / name
    return _official_source(ds_dir, name, split, label_kind) or _folder_source(ds_dir, split)


def convert(name: str, data_dir: str | os.PathLike[str] | None = None,
            out_dir: str | os.PathLike[str] | None = None,
            splits: list[str] | None = None, shard_size: int = 10000, compress: bool = True,
            report: Callable[[str], None] = lambda _msg: None) -> Path:
    """Convert the official files (or image folder) of ``name`` to shards; returns the output folder."""
    root = get_data_dir(data_dir)
    out = Path(out_dir) if out_dir is not None else root / name
    wanted = splits or available_splits(name, root)
    manifest_path = out / "MANIFEST.json"
    manifest: dict = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest_splits = manifest.get("splits", {})
    converted = 0
    for split_name in wanted:
        source = _convertible_source(name, split_name, root, "fine")
        if source is None:
            if splits:
                raise DataError(f"{root / name}: no official files or image folder for split {split_name!r}")
            continue
        split = DatasetSplit(name, split_name, *source.read(), source=str(source.location))
        entries = write_shards(split, out, name, shard_size, compress)
        counts = split.class_counts().tolist()
        info = DATASETS.get(name)
        official = info.splits.get(split_name) if info else None
        manifest_splits[split_name] = {
            "num_samples": len(split), "official_num_samples": official or len(split),
            "complete": official is None or official == len(split),
            "class_counts": dict(zip(split.classes, counts, strict=True)), "shards": entries}
        h, w, c = split.image_shape
        manifest.update({
            "dataset": name, "classes": split.classes, "classes_file": "classes.txt",
            "num_classes": split.num_classes, "image_shape": [h, w] if c == 1 else [h, w, c],
            "image_mode": "L" if c == 1 else "RGB",
            "encoding": {"format": "PNG", "lossless": True,
                         "note": f"converted by dacnn from {source.description}"},
            "shard_format": "tar" + (".gz" if compress else "") + ", WebDataset <key>.png + <key>.cls"})
        report(f"{name}/{split_name}: {len(split)} samples -> {len(entries)} shards in {out}")
        converted += 1
    if not converted:
        raise DataError(f"{root / name}: nothing to convert (no official files or image folder found)")
    manifest["splits"] = manifest_splits
    (out / "classes.txt").write_text("\n".join(manifest["classes"]) + "\n")
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return out
