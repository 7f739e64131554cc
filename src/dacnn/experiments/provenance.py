"""Provenance of a result: which source, commit, machine, device and data made it.

The commit, a hash of the package source and specs (every ``.py`` and ``.yaml`` under
``src/dacnn``, by content), the machine and the torch version. A tree is *dirty* when ``git status``
shows changes under ``src/`` (package source and specs); changes to ``results/``, ``docs/``,
``tests/`` or run outputs do not make a record dirty. A dirty record stores the sha256 of its diff
and is marked in the report. Used by the results store and by ``benchmarks/run_all.py``.
"""

from __future__ import annotations

import hashlib
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

__all__ = ["TreeState", "source_hash", "source_files", "tree_state", "check_clean", "machine_description",
           "git_commit", "device_description", "dataset_checksum", "now_utc"]

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/dacnn
REPO_ROOT = PACKAGE_DIR.parents[1]  # the checkout holding src/dacnn (git answers whether it is one)


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


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
