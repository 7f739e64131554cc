"""The results store: one JSON line per finished run in ``results/<experiment>.jsonl``.

Plain and diff-friendly: a run appends one line (``json.dumps``, fixed key order, floats rounded)
and nothing is ever edited by hand. Smoke-scale records go to ``results/smoke/`` (ignored by git)
so tests and CI never touch the committed store. Files produced by a run beside its record (Figure
7's optimised images) live under ``<store>/artifacts/`` and are named in the record.

A record is keyed by ``(row, scale, config_hash, code_version)``: :meth:`ResultsStore.find` answers
"has this exact configuration already run with this version of the code?", in this experiment or,
for a shared run (the same model trained the same way in two tables), in any other.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "ResultsStore",
    "RECORD_FIELDS",
    "MACHINE_KEYS",
    "config_hash",
    "code_version",
    "git_commit",
    "device_description",
    "dataset_checksum",
    "round_floats",
]

# Every record has these keys, in this order (values may be null where they do not apply).
RECORD_FIELDS = (
    "experiment", "row", "label", "scale", "kind", "config_hash", "code_version", "git_commit", "finished",
    "model", "model_kwargs", "dataset", "dataset_checksum", "train_images", "val_images", "test_images",
    "device", "torch_version", "epochs", "best_epoch", "best_val_acc", "test_acc", "test_error",
    "unique_params", "per_use_params", "flops", "wall_time", "run_dir", "reused_from", "extra", "curve",
    "config",
)
# Training settings that say where or how fast a run happens, not what it computes: left out of the hash.
MACHINE_KEYS = ("data_dir", "out_dir", "run_name", "device", "threads", "tensorboard", "ckpt_every_steps",
                "nan_check_every", "eval_batch_size")
# Speed settings whose unset value ("auto": dacnn.train.speed picks per device) hashes as the fixed
# default they had before, so the records made then keep their hashes.
FORMER_DEFAULTS = {"channels_last": (None, False), "compile": (None, False), "amp": ("auto", "none")}
REPO_ROOT = Path(__file__).resolve().parents[3]


def round_floats(value: Any, digits: int = 4) -> Any:
    """Floats rounded (and nan/inf turned into null) throughout a JSON-like value."""
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [round_floats(v, digits) for v in value]
    return value


def config_hash(train: dict[str, Any], runner: dict[str, Any]) -> str:
    """16 hex digits naming a resolved training config plus the runner's settings (test subset...).

    Machine settings (:data:`MACHINE_KEYS`) and unset (``None``) values are left out, so a training
    setting added later with a ``None`` default does not orphan the records made before it.
    """
    train = {k: FORMER_DEFAULTS[k][1] if k in FORMER_DEFAULTS and v == FORMER_DEFAULTS[k][0] else v
             for k, v in train.items()}
    kept = {k: v for k, v in train.items() if k not in MACHINE_KEYS and v is not None}
    payload = {"train": kept, "runner": {k: v for k, v in runner.items() if v is not None}}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def code_version() -> str:
    """The package version: records made by another version are not reused (bump it to re-run all)."""
    from dacnn import __version__

    return __version__


@cache
def git_commit(repo: Path = REPO_ROOT) -> str:
    """``HEAD``'s commit of the checkout the code runs from, ``+dirty`` if ``src/`` has changes."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


@cache
def device_description(device: str) -> str:
    """``cuda: <GPU name>`` or ``cpu: <model name> (<threads> threads)``."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {name} ({torch.get_num_threads()} threads)"


def dataset_checksum(name: str, data_dir: str | None = None) -> str | None:
    """16 hex digits over the train and test files of a dataset: the manifest's sha256 of each shard
    where there is one, else a sha256 of the file. ``None`` if the files are not found."""
    from dacnn.data import find_source
    from dacnn.data.webdataset import sha256_file

    digest = hashlib.sha256()
    found = False
    for split in ("train", "test"):
        source = find_source(name, split, data_dir)
        if source is None:
            continue
        found = True
        checksums = source.checksums or [None] * len(source.files)
        for path, checksum in zip(source.files, checksums, strict=True):
            digest.update(f"{split}/{path.name}:{checksum or sha256_file(path)}\n".encode())
    return digest.hexdigest()[:16] if found else None


@dataclass
class ResultsStore:
    """``root/<experiment>.jsonl`` (``root/smoke/`` for smoke scale) and ``root/artifacts/``."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def scale_dir(self, scale: str) -> Path:
        return self.root / "smoke" if scale == "smoke" else self.root

    def path(self, experiment: str, scale: str) -> Path:
        return self.scale_dir(scale) / f"{experiment}.jsonl"

    def artifact_dir(self, scale: str) -> Path:
        return self.scale_dir(scale) / "artifacts"

    def append(self, record: dict[str, Any]) -> Path:
        """Append one record (one line, fsynced) to its experiment's file."""
        missing = [k for k in RECORD_FIELDS if k not in record]
        if missing:
            raise ValueError(f"record lacks {missing}")
        line = json.dumps(round_floats({k: record[k] for k in RECORD_FIELDS}), separators=(", ", ": "))
        path = self.path(record["experiment"], record["scale"])
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line cut by a kill: end it, so this record stands alone
                    f.write(b"\n")
            f.write(line.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        return path

    def records(self, experiment: str, scale: str | None = None) -> list[dict[str, Any]]:
        """Records of an experiment (one scale, or all), in the order they were written.

        A line cut short by a kill is skipped.
        """
        scales = [scale] if scale else ["paper", "cpu", "smoke"]
        out: list[dict[str, Any]] = []
        seen: set[Path] = set()
        for sc in scales:
            path = self.path(experiment, sc)
            if path in seen or not path.is_file():
                continue
            seen.add(path)
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and (scale is None or record.get("scale") == scale):
                    out.append(record)
        return out

    def latest(self, experiment: str, scale: str) -> dict[str, dict[str, Any]]:
        """``row -> last record`` of an experiment at a scale (a re-run supersedes an older record)."""
        return {r["row"]: r for r in self.records(experiment, scale)}

    def find(self, experiment: str, row: str, scale: str, chash: str) -> dict[str, Any] | None:
        """The latest record of this row with this config hash and code version, if any."""
        version = code_version()
        for record in reversed(self.records(experiment, scale)):
            if (record.get("row") == row and record.get("config_hash") == chash
                    and record.get("code_version") == version):
                return record
        return None

    def find_any(self, scale: str, chash: str) -> dict[str, Any] | None:
        """A record of any experiment with this config hash and code version (a shared run)."""
        directory = self.scale_dir(scale)
        if not directory.is_dir():
            return None
        version = code_version()
        for path in sorted(directory.glob("*.jsonl")):
            for record in reversed(self.records(path.stem, scale)):
                if record.get("config_hash") == chash and record.get("code_version") == version:
                    return record
        return None


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
