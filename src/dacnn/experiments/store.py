"""The results store: one JSON line per finished run in ``results/<experiment>.jsonl``.

Plain and diff-friendly: a run appends one line (``json.dumps``, fixed key order, floats rounded)
and nothing is ever edited by hand. Smoke-scale records go to ``results/smoke/`` (ignored by git)
so tests and CI never touch the committed store. Files produced by a run beside its record (Figure
7's optimised images) live under ``<store>/artifacts/`` and are named in the record.

A run started with ``--record-every-epoch`` also keeps its record so far (curve, best validation
epoch, no test accuracy; ``extra.partial``) in ``<store>/partial/<experiment>.jsonl``, one line per
run, rewritten atomically after every epoch and dropped when the full record is appended: a run
killed mid-way still leaves its curve. :meth:`ResultsStore.find` never takes a partial record for a
finished run.

A record is keyed by ``(row, scale, config_hash, source_hash)``: :meth:`ResultsStore.find` answers
"has this exact configuration already run with exactly this source?", in this experiment or, for a
shared run (the same model trained the same way in two tables), in any other.

Each record carries its provenance (:mod:`dacnn.experiments.provenance`): commit, source hash,
command line, machine, torch version.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dacnn.experiments.provenance import source_hash
from dacnn.fileio import atomic_write_text

__all__ = [
    "ResultsStore",
    "RECORD_FIELDS",
    "MACHINE_KEYS",
    "config_hash",
    "round_floats",
    "is_partial",
    "record_key",
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
# Speed settings whose unset value ("auto": dacnn.train.speed picks per device) hashes as the fixed
# default they had before, so the records made then keep their hashes.
FORMER_DEFAULTS = {"channels_last": (None, False), "compile": (None, False), "amp": ("auto", "none")}
# Settings added after records were made: at their default they are left out of the hash, so the
# records made before them keep their hashes.
ADDED_SETTINGS = {"translate": 0, "alternate_flip": False, "lr_triangle": [0.2, 0.23, 0.07],
                  "decoupled_weight_decay": False, "norm_bias_lr_scale": 1.0, "freeze_norm_scale": False,
                  "shared_norm_scale": False,
                  "lookahead": False, "whiten": False, "whiten_bias_epochs": 3, "tta": 0}


def is_partial(record: dict[str, Any]) -> bool:
    """A record of a run that had not finished when it was written (``extra.partial``)."""
    return bool((record.get("extra") or {}).get("partial"))


def record_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """What names one run's record: experiment, row, scale, seed, config and source hash."""
    return tuple(record.get(k) for k in ("experiment", "row", "scale", "seed", "config_hash", "source_hash"))


def _record_line(record: dict[str, Any]) -> str:
    missing = [k for k in RECORD_FIELDS if k not in record]
    if missing:
        raise ValueError(f"record lacks {missing}")
    return json.dumps(round_floats({k: record[k] for k in RECORD_FIELDS}), separators=(", ", ": "))


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
        line = _record_line(record)
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

    def partial_path(self, experiment: str, scale: str) -> Path:
        return self.scale_dir(scale) / "partial" / f"{experiment}.jsonl"

    def write_partial(self, record: dict[str, Any], *, drop: bool = False) -> Path:
        """Put ``record`` in place of its run's line in the partial file (atomically), or with
        ``drop`` remove that line (the file goes when it has none left)."""
        path = self.partial_path(record["experiment"], record["scale"])
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(path.parent, os.O_RDONLY)  # the folder itself: no lock file to bring back
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
            kept = []
            for line in lines:
                try:
                    other = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(other, dict) and record_key(other) != record_key(record):
                    kept.append(line)
            if not drop:
                kept.append(_record_line(record))
            if kept:
                atomic_write_text(path, "\n".join(kept) + "\n")
            elif path.is_file():
                path.unlink()
        finally:
            os.close(lock)
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

    def find(self, experiment: str, row: str, scale: str, chash: str, *,
             any_source: bool = False) -> dict[str, Any] | None:
        """The latest record of this row with this config hash and this :func:`source_hash`, if any
        (a partial record does not count). ``any_source``: failing that, the latest clean record with
        this config hash from any code version (what a prune row prunes: a trained model, whichever
        code trained it)."""
        src = source_hash()
        found = [r for r in self.records(experiment, scale)
                 if r.get("row") == row and r.get("config_hash") == chash and not is_partial(r)]
        current = [r for r in found if r.get("source_hash") == src]
        if current:
            return current[-1]
        if any_source:
            clean = [r for r in found if not r.get("dirty")]
            return clean[-1] if clean else None
        return None

    def find_any(self, scale: str, chash: str) -> dict[str, Any] | None:
        """A record of any experiment with this config hash and source hash (a shared run)."""
        directory = self.scale_dir(scale)
        if not directory.is_dir():
            return None
        src = source_hash()
        for path in sorted(directory.glob("*.jsonl")):
            for record in reversed(self.records(path.stem, scale)):
                if (record.get("config_hash") == chash and record.get("source_hash") == src
                        and not is_partial(record)):
                    return record
        return None
