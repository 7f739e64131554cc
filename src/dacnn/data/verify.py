"""``dacnn data verify``: re-read a dataset's files and check everything that can be checked.

Shards with a manifest: each shard's size and sha256, that it is a complete tar of
``<key>.<img>`` + ``<key>.cls`` pairs with consecutive keys, that every image decodes to the
manifest's shape, labels in range, per-shard, per-split and per-class counts, classes.txt.
Official files: md5 against the published checksum, then decode, counts and labels. Image
folders: every image decodes to one size. Same checks as the ``verify.py`` shipped beside such a data folder.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dacnn.data.catalog import DATASETS, SVHN_EXTRA, get_data_dir
from dacnn.data.sources import Source, available_splits, find_source
from dacnn.data.split import DatasetSplit
from dacnn.data.webdataset import (
    ShardRef,
    decode_shard,
    find_shards,
    manifest_image_shape,
    map_shards,
    read_classes_txt,
    read_manifest,
)
from dacnn.errors import DataError

MAX_PROBLEMS_SHOWN = 20


@dataclass
class SplitReport:
    """The outcome of verifying one split; ``ok`` when ``problems`` is empty."""

    dataset: str
    split: str
    kind: str = ""
    samples: int = 0
    class_counts: list[int] = field(default_factory=list)
    image_shape: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        counts = (f" per-class min/max={min(self.class_counts)}/{max(self.class_counts)}"
                  if self.class_counts else "")
        shape = "x".join(str(s) for s in self.image_shape) or "?"
        notes = f" [{'; '.join(self.notes)}]" if self.notes else ""
        return (f"{self.dataset:14s} {self.split:5s} {'OK' if self.ok else 'FAIL':4s} samples={self.samples} "
                f"classes={len(self.class_counts)}{counts} shape={shape} {self.kind}{notes}")


def md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard_summary(ref: ShardRef, shape: tuple[int, int, int] | None, num_classes: int | None
                   ) -> tuple[np.ndarray, list[str], tuple[int, ...]] | str:
    """Labels, keys and image shape of one decoded shard, or the problem as text (runs in a worker)."""
    try:
        if ref.num_bytes is not None and ref.path.is_file() and ref.path.stat().st_size != ref.num_bytes:
            return f"{ref.path}: size {ref.path.stat().st_size} bytes, manifest says {ref.num_bytes}"
        data = decode_shard(ref, shape, num_classes)
    except DataError as exc:
        return str(exc)
    return data.labels, data.keys, data.images.shape[1:]


def _verify_shards(name: str, ds_dir: Path, workers: int | None) -> list[SplitReport]:
    manifest = read_manifest(ds_dir)
    info = DATASETS.get(name)
    classes_txt = read_classes_txt(ds_dir)
    classes = (manifest or {}).get("classes") or classes_txt or (list(info.classes or ()) if info else None)
    shape = manifest_image_shape(manifest) if manifest else (info.image_size if info else None)
    splits = list(manifest["splits"]) if manifest else available_splits(name, ds_dir.parent)
    reports = []
    for split in splits:
        report = SplitReport(name, split, "shards" + (" with manifest" if manifest else " (no manifest)"))
        refs = find_shards(ds_dir, split, manifest)
        if manifest and classes_txt is not None and classes_txt != manifest.get("classes"):
            report.problems.append(f"{ds_dir / 'classes.txt'}: differs from the manifest's class list")
        if not refs:
            report.problems.append(f"{ds_dir}: no shards for split {split!r}")
        results = map_shards(_shard_summary, refs, shape, len(classes) if classes else None, workers=workers)
        labels: list[np.ndarray] = []
        keys: list[str] = []
        for result in results:
            if isinstance(result, str):
                report.problems.append(result)
                continue
            labels.append(result[0])
            keys.extend(result[1])
            report.image_shape = report.image_shape or tuple(result[2])
        all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        report.samples = int(all_labels.size)
        n_classes = len(classes) if classes else int(all_labels.max(initial=-1)) + 1
        report.class_counts = np.bincount(all_labels, minlength=n_classes).tolist() if all_labels.size else []
        if keys and all(k.isdigit() for k in keys):
            numbers = np.asarray([int(k) for k in keys])
            if not np.array_equal(numbers, np.arange(numbers[0], numbers[0] + numbers.size)):
                first = int(np.flatnonzero(numbers != np.arange(numbers[0], numbers[0] + numbers.size))[0])
                report.problems.append(f"{ds_dir}/{split}: keys not consecutive "
                                       f"(sample {first} is {keys[first]})")
        entry = manifest["splits"][split] if manifest else {}
        if manifest and not report.problems:
            if entry.get("num_samples") is not None and report.samples != entry["num_samples"]:
                report.problems.append(f"{split}: {report.samples} samples, "
                                       f"manifest says {entry['num_samples']}")
            want = entry.get("class_counts")
            if want and classes and [want.get(c) for c in classes] != report.class_counts:
                report.problems.append(f"{split}: per-class counts differ from the manifest")
            report.notes.append(f"{len(refs)} shards, sha256 ok")
        if report.samples == 0 and not report.problems:
            report.problems.append(f"{ds_dir}: split {split!r} is empty")
        reports.append(report)
    return reports


def _official_checksum(source: Source) -> tuple[list[str], list[str]]:
    """(notes, problems) from comparing the source's files with the published md5s."""
    info = DATASETS.get(source.location.parent.name)
    known = {f.filename: f.md5 for f in (*(info.official_files if info else ()), SVHN_EXTRA)}
    notes, problems = [], []
    for path in source.files:
        want = known.get(path.name)
        if want is None:
            notes.append(f"{path.name}: no published checksum")
        elif md5_file(path) != want:
            problems.append(f"{path}: md5 differs from the official file's ({want})")
    if not problems and any(p.name in known for p in source.files):
        notes.append("md5 ok")
    return notes, problems


def _verify_other(name: str, split: str, source: Source) -> SplitReport:
    report = SplitReport(name, split, source.description)
    if source.kind in ("cifar", "svhn", "idx"):
        report.notes, report.problems = _official_checksum(source)
    try:
        images, labels, classes = source.read()
        loaded = DatasetSplit(name, split, images, labels, classes, source=str(source.location))
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    report.samples = len(loaded)
    report.class_counts = loaded.class_counts().tolist()
    report.image_shape = loaded.image_shape
    info = DATASETS.get(name)
    if info is not None and source.kind != "folder":
        official = info.splits.get(split)
        if official is not None and report.samples != official:
            report.problems.append(f"{source.location}: {report.samples} samples in {split}, "
                                   f"official {official}")
        if loaded.image_shape != info.image_size:
            report.problems.append(f"{source.location}: images are {loaded.image_shape}, "
                                   f"expected {info.image_size}")
    return report


def verify_dataset(name: str, data_dir: str | os.PathLike[str] | None = None,
                   workers: int | None = None) -> list[SplitReport]:
    """Verify every split of ``name`` found in the data directory; an absent dataset is one problem."""
    root = get_data_dir(data_dir)
    ds_dir = root / name
    try:
        if read_manifest(ds_dir) is not None or any(find_shards(ds_dir, s, None)
                                                    for s in available_splits(name, root)):
            return _verify_shards(name, ds_dir, workers)
        reports = []
        for split in available_splits(name, root):
            source = find_source(name, split, root)
            if source is not None:
                reports.append(_verify_other(name, split, source))
    except DataError as exc:
        return [SplitReport(name, "-", problems=[str(exc)])]
    return reports or [SplitReport(name, "-", problems=[f"{ds_dir}: no data found for {name}"])]


def datasets_present(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the dataset folders in the data directory that hold any readable format."""
    root = get_data_dir(data_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and available_splits(p.name, root))
