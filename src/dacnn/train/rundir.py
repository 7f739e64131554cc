"""Run directories: made atomically, locked while a process trains in them, checked before resuming.

* :func:`create_run_dir`: ``mkdir`` (atomic) of ``<out_dir>/<name>``, else ``<name>-2``, ``-3``...
  so two runs started at once into one ``--out-dir`` get two directories; an ``--out-dir`` that
  cannot be written is reported before any data is loaded.
* :class:`RunLock`: an exclusive ``flock`` on ``<run>/.lock`` for the life of the process (the
  kernel drops it when the process dies, even by SIGKILL); a second process training or resuming
  the same run gets :class:`~dacnn.errors.RunInUse` naming the holder. ``RunLock.slot(run_dir)`` is the
  same lock on ``<run>.lock`` beside it, for the name of a run directory that is about to be
  cleared and made again (``dacnn reproduce``'s content-addressed runs).
* :func:`read_result`, :func:`read_history`, :func:`is_finished`, :func:`has_checkpoint`,
  :func:`best_weights`: what a run
  directory holds, read one way (a ``metrics.jsonl`` line cut by a kill is skipped) by the trainer
  and by the experiments;
* :func:`resume_point`: the state to resume (the newest intact checkpoint, saying so when ``last``
  was damaged), refusing a run that stopped before its first checkpoint, a finished run and a
  change of what the weights depend on (model, dataset, width, depth, model kwargs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from dacnn import checkpoint as ckpt
from dacnn.errors import CheckpointError, ConfigError, DacnnError, RunFinished, RunInUse
from dacnn.train.distributed import DistContext, broadcast_object

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

__all__ = ["default_run_name", "create_run_dir", "find_run_dir", "RunLock", "resume_point", "saved_config",
           "open_run", "ARCHITECTURE_FIELDS", "check_same_architecture", "read_history", "read_result",
           "is_finished", "has_checkpoint", "best_weights"]

#: Config fields the saved weights depend on: a resumed run cannot change them.
ARCHITECTURE_FIELDS = ("model", "dataset", "width", "depth", "model_kwargs")


def default_run_name(model: str | None, dataset: str | None) -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{model}-{dataset}"


def create_run_dir(out_dir: str | Path, name: str) -> Path:
    """Make a new, empty run directory atomically: ``name``, else ``name-2``, ``name-3``..."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out-dir {out}: cannot create it ({exc.strerror or exc})") from None
    path, n = out / name, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
            path = out / f"{name}-{n}"
        except OSError as exc:
            raise ConfigError(f"--out-dir {out}: cannot create the run directory {path.name} there "
                              f"({exc.strerror or exc})") from None


def find_run_dir(run: str | Path, out_dir: str | Path = "runs") -> Path:
    """A run directory given as a path or as a name under ``out_dir``."""
    for candidate in (Path(run), Path(out_dir) / str(run)):
        if (candidate / "checkpoints").is_dir() or (candidate / "config.yaml").is_file():
            return candidate
    raise CheckpointError(f"no run directory {str(run)!r} (looked for it as a path and under {out_dir}/)")


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``metrics.jsonl`` (none if absent; a line cut by a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    history = []
    for line in path.read_text().splitlines():
        try:
            history.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return history


def read_result(run_dir: str | Path) -> dict[str, Any]:
    """A finished run's ``result.json`` with its per-epoch ``history``."""
    path = Path(run_dir) / "result.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable run result ({type(exc).__name__}: {exc})") from None
    return {**result, "history": read_history(run_dir)}


def is_finished(run_dir: str | Path) -> bool:
    """Whether the run wrote its result and its best checkpoint."""
    run_dir = Path(run_dir)
    return (run_dir / "result.json").is_file() and (run_dir / "checkpoints" / "best.json").is_file()


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether the run saved at least one checkpoint (it can be resumed)."""
    return (Path(run_dir) / "checkpoints" / "last.json").is_file()


def best_weights(run_dir: str | Path) -> Path | None:
    """The evaluation weights file of the run's best checkpoint, or None before it has one."""
    checkpoints = Path(run_dir) / "checkpoints"
    if not (checkpoints / "best.json").is_file():
        return None
    return checkpoints / ckpt.read_pointer(checkpoints, "best")["eval_weights"]


class RunLock:
    """Exclusive lock on a run directory, held until :meth:`release` or the process ends."""

    def __init__(self, run_dir: str | Path, *, path: Path | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = path if path is not None else self.run_dir / ".lock"
        self._fd: int | None = None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"run directory {self.run_dir} is not writable "
                              f"({exc.strerror or exc})") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise RunInUse(f"run {self.run_dir} is in use by another training process "
                               f"(pid {holder}); wait for it to end or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    @classmethod
    def slot(cls, run_dir: str | Path) -> RunLock:
        """The lock on ``<run_dir>.lock`` beside the directory (which may not exist yet)."""
        run_dir = Path(run_dir)
        try:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {run_dir.parent} ({exc.strerror or exc})") from None
        return cls(run_dir, path=run_dir.with_name(run_dir.name + ".lock"))

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_same_architecture(saved: Mapping[str, Any], requested: Mapping[str, Any], run_dir: Path) -> None:
    """Refuse a resume that changes what the saved weights depend on."""
    changed = {k: (saved.get(k), requested.get(k)) for k in ARCHITECTURE_FIELDS
               if saved.get(k) != requested.get(k)}
    if changed:
        what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(f"--resume {run_dir}: the run's weights were trained as saved, so these cannot "
                          f"change: {what}; start a new run instead")


def _require_checkpoint(run_dir: Path) -> Path:
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt.list_versions(ckpt_dir) and not (ckpt_dir / "last.json").is_file():
        raise CheckpointError(f"nothing to resume in {run_dir}: it was stopped before its first "
                              "checkpoint; start the run again (same command without --resume)")
    return ckpt_dir


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The config a run saved with its newest intact checkpoint."""
    _, state, _ = ckpt.newest_valid(_require_checkpoint(run_dir), "last")
    return dict(state.get("config") or {})


def resume_point(run_dir: Path, requested: Mapping[str, Any] | None = None,
                 say: Any = print) -> dict[str, Any]:
    """The training state to resume ``run_dir`` from (see the module docstring for what is refused).

    ``requested``: the config the resumed run would use (checked against the saved one).
    """
    _, state, note = ckpt.newest_valid(_require_checkpoint(run_dir), "last")
    if note:
        say(f"warning: {note}")
    saved = state.get("config") or {}
    if requested is not None:
        check_same_architecture(saved, requested, run_dir)
    epochs = int((requested or saved).get("epochs", 0))
    done = state.get("epoch_done") and int(state["epoch"]) + 1 >= epochs
    if done and (run_dir / "result.json").is_file():
        raise RunFinished(f"run {run_dir} is finished ({int(state['epoch']) + 1} epochs trained; "
                          f"result in {run_dir / 'result.json'}); nothing to resume. To train "
                          "longer, resume with a larger --epochs")
    return state


def open_run(config: Mapping[str, Any], resume: str | Path | None, ctx: DistContext,
             say: Any = print) -> tuple[Path, RunLock | None, dict[str, Any] | None]:
    """``(run_dir, lock, resume_state)`` for a new run (created by rank 0) or a resumed one.

    Rank 0 makes and locks the directory and tells the other ranks its name (or its error).
    """
    lock: RunLock | None = None
    outcome: Any = None
    if ctx.is_main:
        try:
            if resume is not None:
                run_dir = find_run_dir(resume, config.get("out_dir", "runs"))
            else:
                name = config.get("run_name") or default_run_name(config.get("model"), config.get("dataset"))
                run_dir = create_run_dir(config.get("out_dir", "runs"), name)
            lock = RunLock(run_dir)
            outcome = str(run_dir)
        except DacnnError as exc:
            outcome = ("error", type(exc).__name__, str(exc))
            if not ctx.enabled:
                raise
    outcome = broadcast_object(outcome, ctx)
    if isinstance(outcome, tuple):
        kind = {"ConfigError": ConfigError, "RunInUse": RunInUse}.get(outcome[1], CheckpointError)
        raise kind(outcome[2])
    run_dir = Path(outcome)
    try:
        state = resume_point(run_dir, config, say) if resume is not None else None
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return run_dir, lock, state
