"""``dacnn data download``: fetch a dataset's official files and check their published md5.

Files go to ``<data_dir>/<name>/<filename>``, written to a temporary file and renamed only once
the checksum matches, so a broken download never looks like data. ``base_url`` (or
``$DACNN_DOWNLOAD_URL``) replaces the official host, e.g. a local mirror: the file is then read
from ``<base_url>/<filename>``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from dacnn.data.catalog import DATASETS, SVHN_EXTRA, OfficialFile, get_data_dir
from dacnn.errors import DataError

CHUNK = 1 << 20


def official_files(name: str, extra: bool = False) -> tuple[OfficialFile, ...]:
    """The files ``download`` fetches for ``name`` (SVHN's 1.3 GB extra split only if ``extra``)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: downloadable are {', '.join(sorted(DATASETS))}")
    files = DATASETS[name].official_files
    return files + (SVHN_EXTRA,) if extra and name == "svhn" else files


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, dest: Path, md5: str, timeout: float = 60.0) -> None:
    """Download ``url`` to ``dest`` atomically; DataError on a network error or checksum mismatch."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) only
                    expected = response.headers.get("Content-Length")
                    received = 0
                    while block := response.read(CHUNK):
                        out.write(block)
                        digest.update(block)
                        received += len(block)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise DataError(f"{url}: download failed: {getattr(exc, 'reason', exc)}") from exc
        if expected is not None and received != int(expected):
            raise DataError(f"{url}: download cut off ({received} of {expected} bytes)")
        if digest.hexdigest() != md5:
            raise DataError(f"{url}: md5 {digest.hexdigest()} does not match the published {md5}; "
                            f"{dest.name} was not written")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download(name: str, data_dir: str | os.PathLike[str] | None = None, base_url: str | None = None,
             extra: bool = False, timeout: float = 60.0,
             report: Callable[[str], None] = lambda _msg: None) -> list[Path]:
    """Fetch the official files of ``name`` into ``<data_dir>/<name>/``; present, intact files are kept."""
    base_url = base_url or os.environ.get("DACNN_DOWNLOAD_URL") or None
    if base_url is not None and not base_url.startswith(("http://", "https://", "file://")):
        raise DataError(f"--base-url {base_url!r}: expected an http(s):// or file:// URL")
    ds_dir = get_data_dir(data_dir) / name
    written = []
    for item in official_files(name, extra):
        dest = ds_dir / item.filename
        if dest.is_file() and _md5(dest) == item.md5:
            report(f"{dest}: present, md5 ok")
            written.append(dest)
            continue
        url = f"{base_url.rstrip('/')}/{item.filename}" if base_url else item.url
        report(f"{url} -> {dest}")
        fetch(url, dest, item.md5, timeout)
        report(f"{dest}: md5 ok")
        written.append(dest)
    return written
