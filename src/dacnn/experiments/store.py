"""The results store: one JSON line per finished run in ``results/<experiment>.jsonl``.

Plain and diff-friendly: a run appends one line (``json.dumps``, fixed key order, floats rounded)
and nothing is ever edited by hand. Smoke-scale records go to ``results/smoke/`` (ignored by git)
so tests and CI never touch the committed store. Files produced by a run beside its record (Figure
7's optimised images) live under ``<store>/artifacts/`` and are named in the record.

A record is keyed by ``(row, scale, config_hash, source_hash)``: :meth:`ResultsStore.find` answers
"has this exact configuration already run with exactly this source?", in this experiment or, for a
shared run (the same model trained the same way in two tables), in any other.

Provenance (:func:`provenance`): the commit, a hash of the package source and specs (every ``.py``
and ``.yaml`` under ``src/dacnn``, by content), the command line, the machine and the torch version.
A tree is *dirty* when ``git status`` shows changes under ``src/`` (package source and specs);
changes to ``results/``, ``docs/``, ``tests/`` or run outputs do not make a record dirty. A dirty
record stores the sha256 of its diff and is marked in the report.
"""

from __future__ import annotations

import fcntl
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

from dacnn.data import find_source
from dacnn.errors import ConfigError
from dacnn.fileio import sha256_file

__all__ = [
    "ResultsStore",
    "RECORD_FIELDS",
    "MACHINE_KEYS",
    "TreeState",
    "config_hash",
    "source_hash",
    "source_files",
    "tree_state",
    "check_clean",
    "machine_description",
    "git_commit",
    "device_description",
    "dataset_checksum",
    "round_floats",
]

# Every record has these keys, in this order (values may be null where they do not apply).
RECORD_FIELDS = (
    "experiment", "row", "label", "scale", "kind", "seed", "config_hash", "source_hash", "git_commit",
    "dirty", "command", "machine", "finished",
    "model", "model_kwargs", "dataset", "dataset_checksum", "train_images", "val_images", "test_images",
    "device", "torch_version", "epochs", "best_epoch", "best_val_acc", "test_acc", "test_error",
    "unique_params", "per_use_params", "flops", "wall_time", "run_dir", "reused_from", "extra", "curve",
    "config",
)
# Training settings that say where or how fast a run happens, not what it computes: left out of the hash.
MACHINE_KEYS = ("data_dir", "out_dir", "run_name", "device", "threads", "tensorboard", "ckpt_every_steps",
                "keep_checkpoints",
                "nan_check_every", "eval_batch_size")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/dacnn
REPO_ROOT = PACKAGE_DIR.parents[1]
# Speed settings whose unset value ("auto": dacnn.train.speed picks per device) hashes as the fixed
# default they had before, so the records made then keep their hashes.
FORMER_DEFAULTS = {"channels_last": (None, False), "compile": (None, False), "amp": ("auto", "none")}
# Settings added after records were made: at their default they are left out of the hash, so the
# records made before them keep their hashes.
ADDED_SETTINGS = {"translate": 0, "alternate_flip": False, "lr_triangle": [0.2, 0.23, 0.07],
                  "decoupled_weight_decay": False, "norm_bias_lr_scale": 1.0, "freeze_norm_scale": False,
                  "lookahead": False, "whiten": False, "whiten_bias_epochs": 3, "tta": 0}


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
    kept = {k: v for k, v in train.items() if k not in MACHINE_KEYS and v is not None
            and not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])}
    payload = {"train": kept, "runner": {k: v for k, v in runner.items() if v is not None}}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def source_files(root: Path = PACKAGE_DIR) -> list[Path]:
    """The files :func:`source_hash` covers: every ``.py`` and ``.yaml`` of the package (specs included)."""
    return sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and p.is_file()
                  and "__pycache__" not in p.parts)


@cache
def source_hash(root: Path = PACKAGE_DIR) -> str:
    """16 hex digits over the path and content of every :func:`source_files` file.

    Any edit of the package or of a spec changes it, so a record can only be reused by the code
    that made it (whatever the package version says).
    """
    digest = hashlib.sha256()
    for path in source_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class TreeState:
    """The checkout the code runs from: ``HEAD``'s commit and, if ``src/`` differs from it, the sha256
    of that difference (``git diff HEAD -- src`` plus the untracked files under ``src/``)."""

    commit: str
    diff_sha256: str | None = None

    @property
    def dirty(self) -> bool:
        return self.diff_sha256 is not None


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30,
                          check=True).stdout


@cache
def tree_state(repo: Path = REPO_ROOT) -> TreeState:
    """The commit and dirtiness of ``repo``.

    Outside a git checkout (a copy of the tree on a lent machine) the commit comes from
    ``$DACNN_SOURCE_COMMIT`` = ``<commit>:<source hash>``, written where the copy was made from a
    clean tree, and holds only if the copy's :func:`source_hash` is that hash; otherwise the state is
    ``unknown`` and dirty.
    """
    try:
        _git(repo, "rev-parse", "--git-dir")
    except (OSError, subprocess.SubprocessError):
        commit, _, src = os.environ.get("DACNN_SOURCE_COMMIT", "").partition(":")
        if commit and src == source_hash():
            return TreeState(commit)
        return TreeState("unknown", "unknown")
    try:
        head = _git(repo, "rev-parse", "HEAD").strip()
        status = _git(repo, "status", "--porcelain", "--untracked-files=all", "--", "src")
        if not status.strip():
            return TreeState(head)
        digest = hashlib.sha256(_git(repo, "diff", "--binary", "HEAD", "--", "src").encode())
        for name in sorted(_git(repo, "ls-files", "--others", "--exclude-standard", "--", "src").split()):
            digest.update(name.encode() + b"\0" + (repo / name).read_bytes())
    except (OSError, subprocess.SubprocessError):
        return TreeState("unknown", "unknown")
    return TreeState(head, digest.hexdigest())


def git_commit(repo: Path = REPO_ROOT) -> str:
    """``HEAD``'s commit of the checkout the code runs from, ``+dirty`` if ``src/`` has changes."""
    state = tree_state(repo)
    return state.commit + ("+dirty" if state.dirty else "")


def check_clean(allow_dirty: bool, repo: Path = REPO_ROOT) -> TreeState:
    """The tree state; a dirty tree raises :class:`ConfigError` unless ``allow_dirty``."""
    state = tree_state(repo)
    if state.dirty and not allow_dirty:
        raise ConfigError(f"{repo}: src/ has uncommitted changes (git status -- src); commit them, or pass "
                          "--allow-dirty to record anyway (the record is then marked dirty)")
    return state


@cache
def machine_description() -> dict[str, Any]:
    """CPU model, cores, torch threads, GPU name (or None), OS and Python version of this machine."""
    import torch

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": name, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu,
            "os": platform.platform(terse=True), "python": platform.python_version()}


@cache
def device_description(device: str) -> str:
    """``cuda: <GPU name>`` or ``cpu: <model name> (<threads> threads)``."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    return f"cpu: {machine_description()['cpu']} ({torch.get_num_threads()} threads)"


def dataset_checksum(name: str, data_dir: str | None = None) -> str | None:
    """16 hex digits over the train and test files of a dataset: the manifest's sha256 of each shard
    where there is one, else a sha256 of the file. ``None`` if the files are not found."""

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
            fcntl.flock(f, fcntl.LOCK_EX)  # two --jobs processes may finish at once
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

    def runs(self, experiment: str, scale: str) -> dict[str, list[dict[str, Any]]]:
        """``row -> [last record of each seed]`` (seeds in the order first written)."""
        out: dict[str, dict[Any, dict[str, Any]]] = {}
        for r in self.records(experiment, scale):
            out.setdefault(r["row"], {})[r.get("seed")] = r
        return {row: list(by_seed.values()) for row, by_seed in out.items()}

    def find(self, experiment: str, row: str, scale: str, chash: str) -> dict[str, Any] | None:
        """The latest record of this row with this config hash and this :func:`source_hash`, if any."""
        src = source_hash()
        for record in reversed(self.records(experiment, scale)):
            if (record.get("row") == row and record.get("config_hash") == chash
                    and record.get("source_hash") == src):
                return record
        return None

    def find_any(self, scale: str, chash: str) -> dict[str, Any] | None:
        """A record of any experiment with this config hash and source hash (a shared run)."""
        directory = self.scale_dir(scale)
        if not directory.is_dir():
            return None
        src = source_hash()
        for path in sorted(directory.glob("*.jsonl")):
            for record in reversed(self.records(path.stem, scale)):
                if record.get("config_hash") == chash and record.get("source_hash") == src:
                    return record
        return None


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
