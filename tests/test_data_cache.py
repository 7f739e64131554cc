"""The decode cache (:mod:`dacnn.data.cache`) is keyed on file contents and location."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dacnn.data import cache as decoded_cache
from dacnn.data.sources import load_dataset
from dacnn.data.synthetic import write_fashion_mnist

N, PIXELS, MIDDLE = 400, 28 * 28, 200  # 313 KB of images: the flipped byte is far from both ends


def _flip(path: Path, offset: int) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def test_a_copy_with_one_flipped_byte_is_not_served_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DACNN_CACHE", str(tmp_path / "cache"))
    write_fashion_mnist(tmp_path / "a" / "fashion_mnist", "train", n=N, gz=False)
    original = load_dataset("fashion_mnist", "train", data_dir=tmp_path / "a")
    assert list((tmp_path / "cache" / "decoded").glob("fashion_mnist-train-*.npz"))
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copy2)  # keeps mtimes
    _flip(tmp_path / "b" / "fashion_mnist" / "train-images-idx3-ubyte", 16 + MIDDLE * PIXELS)
    copy = load_dataset("fashion_mnist", "train", data_dir=tmp_path / "b")
    assert copy.images[MIDDLE, 0, 0, 0] == original.images[MIDDLE, 0, 0, 0] ^ 0xFF
    _flip(tmp_path / "a" / "fashion_mnist" / "train-images-idx3-ubyte", 16 + MIDDLE * PIXELS)
    changed = load_dataset("fashion_mnist", "train", data_dir=tmp_path / "a")  # the file itself changed
    assert changed.images[MIDDLE, 0, 0, 0] == original.images[MIDDLE, 0, 0, 0] ^ 0xFF


def test_the_key_names_the_data_directory(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(b"same bytes")
        os.utime(tmp_path / name / "f", ns=(10**18, 10**18))
    keys = {decoded_cache.cache_key(["t"], [tmp_path / name / "f"]) for name in ("a", "b")}
    assert len(keys) == 2
