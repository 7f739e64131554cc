"""Atomic file writes (a kill at any moment leaves either the old file or the new one, never half)
and file checksums."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from dacnn.errors import WriteError

__all__ = [
    "atomic_write", "atomic_write_text", "write_error", "check_writable", "torch_load_reason", "sha256_file",
]


def write_error(path: str | Path, exc: BaseException) -> WriteError | None:
    """A :class:`WriteError` naming ``path`` for an I/O failure (safetensors' "os error N" too), or None."""
    if isinstance(exc, WriteError):
        return exc
    if isinstance(exc, OSError):
        code, reason = exc.errno, exc.strerror or str(exc)
    else:
        match = re.search(r"os error (\d+)", str(exc))
        if match is None:
            return None
        code, reason = int(match.group(1)), os.strerror(int(match.group(1)))
    return WriteError(code, f"cannot write {path}: {reason}", str(path))


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, fsync it, rename it over ``path``.

    A crash before the rename leaves ``path`` untouched; a crash after leaves the new content. An I/O
    failure (read-only place, full disk) raises :class:`~dacnn.errors.WriteError` naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        error = write_error(path, exc) if isinstance(exc, Exception) else None
        if error is not None and error is not exc:
            raise error from None
        raise
    _fsync_path(path.parent, directory=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def check_writable(path: str | Path, what: str = "output") -> Path:
    """Check a file can be created at ``path`` (nothing is left behind); else :class:`WriteError`.

    Commands call it before any work, so a read-only ``--output`` is reported at once. Folders
    still to be made are checked at the nearest one that exists.
    """
    path = Path(path)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    probe = folder / f".{path.name}.probe{os.getpid()}"
    try:
        if not folder.is_dir():
            raise NotADirectoryError(20, os.strerror(20))
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        raise WriteError(exc.errno, f"cannot write {what} {path}: {exc.strerror or exc}", str(path)) from None
    return path


def torch_load_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in words a user can act on.

    Never torch's own advice to retry with ``weights_only=False``: that runs whatever code the
    file holds, and a file that needs it is not a trusted checkpoint.
    """
    text = str(exc)
    if "Unsupported global" in text or "GLOBAL" in text:
        return "it holds Python objects that a safe (weights-only) load refuses to run"
    return "the file is damaged, truncated or not a PyTorch checkpoint"
def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
