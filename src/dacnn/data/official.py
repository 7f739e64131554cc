"""Readers for the official distribution formats.

* CIFAR-10 / CIFAR-100 "python version": a tar.gz of pickled batches (``data`` uint8 (N, 3072) in
  CHW order, ``labels`` / ``fine_labels`` + ``coarse_labels``, class names in ``batches.meta`` /
  ``meta``). Read from the archive or the extracted folder. Unpickling is restricted to numpy
  arrays and plain containers, so a hostile archive cannot run code.
* SVHN cropped digits: ``{train,test,extra}_32x32.mat`` with ``X`` (32, 32, 3, N) and ``y`` (N, 1) in
  1..10, where 10 means digit 0 (scipy is imported only here).
* Fashion-MNIST: IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np

from dacnn.errors import DataError

CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}, "batches.meta"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python",
                 {"train": ["train"], "test": ["test"]}, "meta"),
}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SVHN_SPLITS = ("train", "test", "extra")

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickle only numpy arrays, numbers, strings, lists and dicts."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset file")
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a corrupt file
        raise DataError(f"{where}: not a readable CIFAR pickle: {exc}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def cifar_source(ds_dir: Path, name: str) -> Path | None:
    """The CIFAR archive or extracted folder in ``ds_dir``, if any."""
    archive, folder, _, _ = CIFAR_LAYOUT[name]
    for candidate in (ds_dir / archive, ds_dir / folder):
        if candidate.exists():
            return candidate
    return None


def _read_cifar_members(source: Path, folder: str, wanted: list[str]) -> dict[str, bytes]:
    if source.is_dir():
        found = {}
        for member in wanted:
            path = source / member
            if not path.is_file():
                raise DataError(f"{path}: file not found")
            found[member] = path.read_bytes()
        return found
    found = {}
    try:
        with tarfile.open(source, "r:*") as tar:
            for info in tar:
                base = info.name.split("/")[-1]
                if info.isfile() and base in wanted and info.name.startswith(folder):
                    handle = tar.extractfile(info)
                    assert handle is not None
                    found[base] = handle.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{source}: truncated or corrupt archive: {exc}") from exc
    missing = [m for m in wanted if m not in found]
    if missing:
        raise DataError(f"{source}: archive lacks {folder}/{missing[0]}")
    return found


def read_cifar(source: Path, name: str, split: str, label_kind: str = "fine"
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10/100 python format -> (images uint8 (N,32,32,3), labels int64, classes).

    ``label_kind`` picks CIFAR-100's ``fine`` (100) or ``coarse`` (20) labels.
    """
    _, folder, batches, meta_name = CIFAR_LAYOUT[name]
    if split not in batches:
        raise DataError(f"{name}: no split {split!r} (have {sorted(batches)})")
    if label_kind not in ("fine", "coarse") or (label_kind == "coarse" and name != "cifar100"):
        raise DataError(f"{name}: label kind {label_kind!r} not available")
    members = _read_cifar_members(source, folder, batches[split] + [meta_name])
    meta = _unpickle(members[meta_name], f"{source}:{meta_name}")
    names_key = "label_names" if name == "cifar10" else f"{label_kind}_label_names"
    labels_key = "labels" if name == "cifar10" else f"{label_kind}_labels"
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(names_key, [])]
    images, labels = [], []
    for member in batches[split]:
        batch = _unpickle(members[member], f"{source}:{member}")
        data = np.asarray(batch.get("data"))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{source}:{member}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072) "
                            "(32x32 RGB)")
        batch_labels = np.asarray(batch.get(labels_key, []), dtype=np.int64)
        if batch_labels.shape != (data.shape[0],):
            raise DataError(f"{source}:{member}: {batch_labels.shape[0]} labels for {data.shape[0]} images")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes


def svhn_source(ds_dir: Path, split: str) -> Path | None:
    path = ds_dir / f"{split}_32x32.mat"
    return path if path.is_file() else None


_LOADMAT = """import sys, numpy as np, scipy.io
mat = scipy.io.loadmat(sys.argv[1], variable_names=("X", "y"))
np.savez(sys.argv[2], **{k: np.asarray(mat[k]) for k in ("X", "y") if k in mat})
"""


def _loadmat_isolated(path: Path) -> dict[str, np.ndarray]:
    """``scipy.io.loadmat`` in a child process: scipy's MAT reader can crash (SIGSEGV) on a damaged
    file (found by ``tests/test_fuzz_readers.py``), which must be an error here, not our death."""
    with tempfile.TemporaryDirectory(prefix="dacnn-mat-") as tmp:
        out = Path(tmp) / "mat.npz"
        proc = subprocess.run([sys.executable, "-c", _LOADMAT, str(path), str(out)], capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            if proc.returncode < 0:
                reason = f"the MATLAB reader crashed on it (signal {-proc.returncode})"
            else:
                lines = proc.stderr.strip().splitlines()
                reason = lines[-1] if lines else f"the MATLAB reader exited with {proc.returncode}"
            raise DataError(f"{path}: not a readable MATLAB file: {reason}")
        try:
            with np.load(out, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable MATLAB file: {exc}") from None


def read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN ``*_32x32.mat`` -> (images uint8 (N,32,32,3), labels int64 with 10 mapped to 0)."""
    try:
        import scipy.io  # noqa: F401 - checked here, used by the reader process
    except ImportError as exc:  # pragma: no cover - scipy is a dev dependency
        raise DataError(f"{path}: reading SVHN .mat files needs scipy (pip install 'dacnn[mat]')") from exc
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    mat = _loadmat_isolated(path)
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path}: lacks the variables X and y")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise DataError(f"{path}: X is {x.dtype} {x.shape}, expected uint8 (32, 32, 3, N)")
    if y.shape[0] != x.shape[3]:
        raise DataError(f"{path}: {y.shape[0]} labels for {x.shape[3]} images")
    labels = y.astype(np.int64)
    bad = np.flatnonzero((labels < 1) | (labels > 10))
    if bad.size:
        raise DataError(f"{path}: label {labels[bad[0]]} at index {bad[0]} out of range [1, 10]")
    labels[labels == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), labels


def idx_source(ds_dir: Path, split: str) -> tuple[Path, Path] | None:
    if split not in IDX_FILES:
        return None
    found = []
    for stem in IDX_FILES[split]:
        candidates = [ds_dir / (stem + ".gz"), ds_dir / stem]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file (optionally gzipped) as a numpy array of its declared shape."""
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: truncated or corrupt gzip: {exc}") from exc
    if len(data) < 4 or data[0:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: IDX header cut off")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DataError(f"{path}: {len(data) - header} data bytes, header {shape} needs {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_fashion_mnist(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST IDX pair -> (images uint8 (N,28,28,1), labels int64)."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: images have shape {images.shape}, expected (N, H, W)")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{labels_path}: {labels.shape} labels for {images.shape[0]} images")
    return images[..., None].copy(), labels.astype(np.int64)
