"""``dacnn results merge DIR``: append the records a lent GPU brought back (its ``$OUT``) to ``results/``.

``DIR`` is what came back (its ``results/`` folder, or that folder itself): ``<experiment>.jsonl``
files of finished runs and ``partial/<experiment>.jsonl`` of runs stopped mid-way (their curve so
far, ``extra.partial``; merged only where the same run has no finished record). Every record is
checked before anything is written, and one bad record refuses the whole merge with one line naming
the file, the line and the field:

* it has exactly the store's fields (:data:`~dacnn.experiments.store.RECORD_FIELDS`) in order, names a
  known spec and row, is at ``paper`` or ``cpu`` scale;
* it is clean (``dirty`` is null: no uncommitted change under ``src/``), and its ``git_commit`` is a
  commit of this repository whose source hash (the package source and specs at that commit) is the
  record's ``source_hash``: the record can be traced to the code that made it.

Records are only ever appended (one fsynced line each, as :meth:`ResultsStore.append` writes); a record
already in the store (same run, same finish time) is skipped, so merging twice changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dacnn.errors import ConfigError
from dacnn.experiments.provenance import PACKAGE_DIR, REPO_ROOT
from dacnn.experiments.spec import SPEC_DIR, SpecError, get_spec
from dacnn.experiments.store import RECORD_FIELDS, ResultsStore, is_partial, record_key

__all__ = ["MergeResult", "merge_records", "source_hash_at"]

MERGED_SCALES = ("paper", "cpu")


@dataclass
class MergeResult:
    """What a merge appended and skipped, per experiment file."""

    appended: dict[str, int] = field(default_factory=dict)
    partial: int = 0  # of the appended, records of runs stopped mid-way
    skipped: int = 0  # already in the store, or a partial record superseded by a finished one

    @property
    def total(self) -> int:
        return sum(self.appended.values())


def _git(repo: Path, *args: str, stdin: bytes | None = None) -> bytes:
    return subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True, timeout=60,
                          check=True).stdout


def source_hash_at(commit: str, repo: Path = REPO_ROOT) -> str | None:
    """:func:`~dacnn.experiments.store.source_hash` of the package as it is at ``commit`` (read from
    git, the working tree untouched), or ``None`` if ``commit`` is not a commit of ``repo``."""
    try:
        _git(repo, "cat-file", "-e", f"{commit}^{{commit}}")
    except (OSError, subprocess.SubprocessError):
        return None
    package = PACKAGE_DIR.relative_to(repo).as_posix()
    listing = _git(repo, "ls-tree", "-r", "-z", commit, "--", package).decode().split("\0")
    blobs: dict[Path, str] = {}
    for entry in filter(None, listing):
        meta, path = entry.split("\t", 1)
        _, kind, sha = meta.split()
        rel = Path(path).relative_to(package)
        if kind == "blob" and rel.suffix in (".py", ".yaml") and "__pycache__" not in rel.parts:
            blobs[PACKAGE_DIR / rel] = sha
    order = sorted(blobs)  # the order source_files() gives the same paths on disk
    batch = _git(repo, "cat-file", "--batch", stdin="".join(f"{blobs[p]}\n" for p in order).encode())
    digest, pos = hashlib.sha256(), 0
    for path in order:
        end = batch.index(b"\n", pos)
        size = int(batch[pos:end].split()[2])
        content = batch[end + 1:end + 1 + size]
        pos = end + 1 + size + 1
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(content).digest())
    return digest.hexdigest()[:16]


def _files(source: Path) -> tuple[Path, list[Path], list[Path]]:
    if not source.is_dir():
        raise ConfigError(f"{source}: no such directory (the folder a GPU run brought back)")
    base = source / "results" if (source / "results").is_dir() else source
    finished = sorted(base.glob("*.jsonl"))
    partial = sorted((base / "partial").glob("*.jsonl"))
    if not finished and not partial:
        raise ConfigError(f"{source}: no records (<experiment>.jsonl, partial/<experiment>.jsonl) in {base}")
    return base, finished, partial


class _Checker:
    """Checks one record at a time; remembers each commit's source hash."""

    def __init__(self, repo: Path, spec_dir: Path) -> None:
        self.repo, self.spec_dir = repo, spec_dir
        self.hashes: dict[str, str | None] = {}

    def check(self, record: Any, where: str, experiment: str) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{where}: field {name!r}: {why}")

        if not isinstance(record, dict):
            raise ConfigError(f"{where}: not a JSON object")
        missing = [k for k in RECORD_FIELDS if k not in record]
        if missing:
            raise bad(missing[0], "missing (not a record of this store's format)")
        if list(record) != list(RECORD_FIELDS):
            extra = [k for k in record if k not in RECORD_FIELDS]
            raise bad(extra[0] if extra else "experiment",
                      "unknown field" if extra else "fields out of the store's order")
        if record["experiment"] != experiment:
            raise bad("experiment", f"{record['experiment']!r} in the file of {experiment!r}")
        try:
            spec = get_spec(experiment, self.spec_dir)
        except SpecError:
            raise bad("experiment", f"{experiment!r} is not a known experiment") from None
        if str(record["row"]) not in {r.id for r in spec.rows}:
            raise bad("row", f"{record['row']!r} is not a row of {experiment}")
        if record["scale"] not in MERGED_SCALES:
            raise bad("scale", f"{record['scale']!r}: only {' and '.join(MERGED_SCALES)} records are merged")
        if record["dirty"] or str(record["git_commit"]).endswith("+dirty"):
            raise bad("dirty", f"{record['dirty']!r}: recorded from a tree with uncommitted changes under "
                      "src/; re-run from a clean tree pinned by `scripts/gpu-campaign --prepare`")
        commit = str(record["git_commit"])
        if not re.fullmatch(r"[0-9a-f]{40}", commit):
            raise bad("git_commit", f"{commit!r} is not a commit (the tree it came from was not pinned)")
        if commit not in self.hashes:
            self.hashes[commit] = source_hash_at(commit, self.repo)
        at = self.hashes[commit]
        if at is None:
            raise bad("git_commit", f"{commit} is not a commit of {self.repo} (fetch it, or the record "
                      "comes from elsewhere)")
        if record["source_hash"] != at:
            raise bad("source_hash", f"{record['source_hash']!r} is not the source of commit {commit[:12]} "
                      f"({at}): the record was made by other code")
        if is_partial(record) and record["test_acc"] is not None:
            raise bad("test_acc", "a partial record has no test accuracy")


def _read(path: Path, checker: _Checker, partial: bool) -> list[dict[str, Any]]:
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not JSON ({exc.msg})") from None
        checker.check(record, where, path.stem)
        if partial and not is_partial(record):
            raise ConfigError(f"{where}: field 'extra': a record in partial/ without extra.partial")
        out.append(record)
    return out


def merge_records(source: str | Path, results: str | Path = "results", *, repo: Path = REPO_ROOT,
                  spec_dir: Path = SPEC_DIR) -> MergeResult:
    """Check every record under ``source`` (module docstring), then append the new ones to ``results``."""
    source = Path(source)
    _, finished_files, partial_files = _files(source)
    checker = _Checker(repo, spec_dir)
    finished = [r for path in finished_files for r in _read(path, checker, partial=False)]
    partial = [r for path in partial_files for r in _read(path, checker, partial=True)]
    store = ResultsStore(Path(results))
    result = MergeResult()
    done_runs = {record_key(r) for r in finished}
    files = {(r["experiment"], r["scale"]) for r in finished + partial}
    present = {(record_key(r), r.get("finished")) for exp, scale in sorted(files)
               for r in store.records(exp, scale)}
    for record in finished + partial:
        if (record_key(record), record["finished"]) in present or (
                is_partial(record) and record_key(record) in done_runs):
            result.skipped += 1
            continue
        store.append(record)
        present.add((record_key(record), record["finished"]))
        name = f"{store.path(record['experiment'], record['scale'])}"
        result.appended[name] = result.appended.get(name, 0) + 1
        result.partial += is_partial(record)
    return result
