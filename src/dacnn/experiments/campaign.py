"""Several specs at once, with ``--jobs N`` single-threaded training processes side by side.

``dacnn reproduce table1 table2 --scale cpu --jobs 2 --resume``: every training row (each seed of
it) still missing is run as its own ``dacnn reproduce SPEC --rows ROW --seeds SEED --threads 1``
process, at most ``N`` at a time, each logging to ``<runs>/<scale>/logs/``; a run shared by two
specs trains once. Then one ordinary pass over the specs copies shared runs and runs the prune rows.
On a 2-core machine two 1-thread processes train faster than one 2-thread process (the convolutions
of these small models do not scale across threads). A killed campaign re-run with ``--resume`` skips
finished rows and continues interrupted ones from their last checkpoint; a child dies with its
parent, and a lock on each run directory keeps two processes from training the same run.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dacnn.experiments.estimate import estimate_row
from dacnn.experiments.planning import PlannedRow, RunOptions, plan
from dacnn.experiments.provenance import check_clean
from dacnn.experiments.runner import reproduce, row_status
from dacnn.experiments.spec import SPEC_DIR, get_spec
from dacnn.experiments.store import ResultsStore
from dacnn.train.runlog import format_duration

__all__ = ["Job", "pending_jobs", "run_campaign"]

TRAINING_KINDS = ("train", "filters")


@dataclass
class Job:
    """One training row (one seed) to run in its own process."""

    planned: PlannedRow
    argv: list[str]
    log: Path
    seconds: float | None = None  # estimated

    @property
    def name(self) -> str:
        return self.planned.name


def _child_argv(p: PlannedRow, opts: RunOptions) -> list[str]:
    argv = ["reproduce", p.spec.name, "--scale", opts.scale, "--rows", p.row.id, "--threads", "1",
            "--results", str(opts.results), "--runs-dir", str(opts.runs_dir), "--quiet"]
    if p.resolved.seeds:
        argv += ["--seeds", str(p.train["seed"])]
    for flag, value in (("--data-dir", opts.data_dir), ("--device", opts.device)):
        if value is not None:
            argv += [flag, str(value)]
    if Path(opts.spec_dir) != SPEC_DIR:
        argv += ["--spec-dir", str(opts.spec_dir)]
    for key, value in opts.overrides.items():
        argv += ["--override", f"{key}={json.dumps(value)}"]  # JSON is YAML
    if opts.note:
        argv += ["--note", opts.note]
    for flag, on in (("--resume", opts.resume), ("--allow-dirty", opts.allow_dirty), ("--force", opts.force),
                     ("--record-every-epoch", opts.partial_records)):
        if on:
            argv.append(flag)
    return argv


def pending_jobs(names: list[str], opts: RunOptions) -> list[Job]:
    """The training runs of ``names`` still to do, one per config hash, in spec and row order."""
    store = ResultsStore(opts.results)
    seen: set[str] = set()
    jobs = []
    for name in names:
        _, planned = plan(get_spec(name, opts.spec_dir), opts)
        for p in planned:
            if p.row.kind not in TRAINING_KINDS or p.chash in seen:
                continue
            seen.add(p.chash)
            if not opts.force and row_status(p, store) in ("done", "shared"):
                continue
            log = opts.runs_dir / opts.scale / "logs" / (p.name.replace("/", "-").replace("#", "-s") + ".log")
            jobs.append(Job(p, _child_argv(p, opts), log))
    return jobs


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start(job: Job) -> subprocess.Popen[bytes]:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(job.log, "ab") as log:  # the child keeps its own copy of the descriptor
        log.write(f"$ dacnn {shlex.join(job.argv)}\n".encode())
        log.flush()
        return subprocess.Popen([sys.executable, "-m", "dacnn", *job.argv], stdout=log,
                                stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def _estimate(jobs: list[Job], n: int, say: Any) -> None:
    total = 0.0
    for job in jobs:
        job.seconds, _ = estimate_row(job.planned)
        total += job.seconds
    # n processes share the work; the longest job bounds the wall time from below
    wall = max(total / n, max((j.seconds or 0.0) for j in jobs))
    say(f"estimate: {len(jobs)} training runs, ~{total / 3600:.2f} CPU-hours at this machine's current "
        f"speed, ~{format_duration(wall)} with {n} jobs")


def run_campaign(names: list[str], opts: RunOptions, *, estimate: bool = True) -> int:
    """Run the missing rows of ``names`` with ``opts.jobs`` processes; 0 when every job succeeded."""
    say = opts.say
    if opts.scale != "smoke":
        check_clean(opts.allow_dirty)
    jobs = pending_jobs(names, opts)
    say(f"{len(jobs)} training runs to do over {', '.join(names)} at {opts.scale} scale, "
        f"{opts.jobs} at a time")
    if jobs and estimate:
        _estimate(jobs, opts.jobs, say)
    start = time.monotonic()
    running: list[tuple[Job, subprocess.Popen[bytes], float]] = []
    failed: list[str] = []
    queue = list(jobs)
    done = 0
    try:
        while queue or running:
            while queue and len(running) < opts.jobs:
                job = queue.pop(0)
                running.append((job, _start(job), time.monotonic()))
                say(f"[{done + len(running)}/{len(jobs)}] {job.name}: started (log {job.log})")
            time.sleep(0.2 if opts.scale == "smoke" else 5.0)
            for item in list(running):
                job, proc, began = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                done += 1
                took = time.monotonic() - began
                status = "finished" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                if proc.returncode != 0:
                    failed.append(job.name)
                say(f"  {job.name}: {status} in {took / 60:.1f} min ({done}/{len(jobs)} done, "
                    f"{(time.monotonic() - start) / 3600:.2f} h elapsed)")
    finally:
        for _, proc, _ in running:  # interrupted: stop the children (their runs resume with --resume)
            proc.terminate()
    if failed:
        say(f"{len(failed)} runs failed ({', '.join(failed)}): see their logs; re-run with --resume")
        return 1
    serial = replace(opts, jobs=1, force=False, threads=opts.threads or 1)
    for name in names:  # copy shared runs, run prune rows, write nothing twice
        reproduce(name, serial)
    say(f"campaign done in {(time.monotonic() - start) / 3600:.2f} h")
    return 0
