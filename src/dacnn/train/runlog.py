"""Run directory logs: ``metrics.jsonl`` (a line per epoch), ``summary.csv``, ``result.json``, TensorBoard.

Only rank 0 writes (a :class:`RunLog` built with ``enabled=False`` does nothing). Each epoch's record is
appended to ``metrics.jsonl`` and ``summary.csv`` is rewritten from all records (timm's habit: one row
per epoch), so both stay consistent after ``--resume``, which first drops records of epochs the
checkpoint had not finished.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from dacnn.checkpoint import atomic_write_text
from dacnn.errors import ConfigError
from dacnn.train.rundir import read_history

__all__ = ["RunLog", "format_duration", "progress_bar"]


class RunLog:
    """Per-epoch metrics of one run, mirrored to files (and TensorBoard when asked)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "--tensorboard needs the tensorboard package: pip install 'dacnn[tb]'"
                ) from None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def resume(self, completed_epochs: int) -> None:
        """Keep the records of epochs ``< completed_epochs`` (what the checkpoint covers)."""
        if not self.metrics_path.is_file():
            return
        self.records += [r for r in read_history(self.run_dir)
                         if r.get("epoch", completed_epochs) < completed_epochs]
        if self.enabled:
            self._rewrite()

    def truncate(self, completed_epochs: int | None) -> None:
        """Drop records of epochs ``>= completed_epochs`` (a refused epoch after a divergence)."""
        if completed_epochs is None:
            return
        self.records = [r for r in self.records if r.get("epoch", 0) < completed_epochs]
        if self.enabled and self.metrics_path.is_file():
            self._rewrite()

    def log_epoch(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._write_csv()
        if self._tb is not None:
            step = record["epoch"] + 1
            for key, value in record.items():
                if key != "epoch" and isinstance(value, int | float) and value is not None:
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def write_result(self, result: dict[str, Any]) -> None:
        if self.enabled:
            atomic_write_text(self.run_dir / "result.json", json.dumps(result, indent=1) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    def _rewrite(self) -> None:
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._write_csv()

    def _write_csv(self) -> None:
        columns: list[str] = []
        for record in self.records:
            columns += [k for k in record if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.records)
        atomic_write_text(self.run_dir / "summary.csv", buf.getvalue())


def format_duration(seconds: float) -> str:
    """``75.3`` -> ``1m15s``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on a terminal (stderr is a TTY), else ``None`` so CI logs stay clean."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
