"""``dacnn data list|verify|download|convert``; download is tested against a server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from dacnn.cli import main
from dacnn.data import DATASETS, load_dataset
from dacnn.data.catalog import OfficialFile
from dacnn.data.synthetic import write_cifar, write_fashion_mnist, write_image_folder

SHARED = Path(os.environ.get("DACNN_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DACNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DACNN_DOWNLOAD_URL", raising=False)
    monkeypatch.delenv("DACNN_DATA", raising=False)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["data", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def converted_toy(tmp_path: Path) -> Path:
    write_image_folder(tmp_path / "data" / "toy" / "train", classes=("a", "b"), per_class=6, size=(8, 8))
    write_image_folder(tmp_path / "data" / "toy" / "test", classes=("a", "b"), per_class=2, size=(8, 8),
                       seed=1)
    main(["data", "convert", "toy", "--data-dir", str(tmp_path / "data"),
          "--out", str(tmp_path / "shards" / "toy"), "--shard-size", "5"])
    return tmp_path / "shards"


def test_list_shows_formats_and_missing_datasets(tmp_path, capsys):
    write_fashion_mnist(tmp_path / "fashion_mnist", "train", n=5)
    write_cifar(tmp_path / "cifar10", "cifar10", n_train=4, n_test=2)
    code, out, _ = run_cli(capsys, "list", "--data-dir", tmp_path)
    assert code == 0 and f"data dir:  {tmp_path} (from --data-dir)" in out
    lines = {line.split()[0]: line for line in out.splitlines()[3:]}
    assert "official IDX" in lines["fashion_mnist"] and "train" in lines["fashion_mnist"]
    assert "official python archive" in lines["cifar10"] and "test train" in lines["cifar10"]
    assert "not found" in lines["svhn"] and "dacnn data download svhn" in lines["svhn"]


def test_convert_then_verify_passes_and_shards_read_back(tmp_path, capsys):
    root = converted_toy(tmp_path)
    capsys.readouterr()
    code, out, _ = run_cli(capsys, "verify", "toy", "--data-dir", root)
    assert code == 0, out
    assert "toy            train OK   samples=12 classes=2 per-class min/max=6/6 shape=8x8x3" in out
    assert "test  OK   samples=4" in out and "all OK: 16 samples" in out
    original = load_dataset("toy", "train", tmp_path / "data", cache=False)
    shards = load_dataset("toy", "train", root, cache=False)
    assert np.array_equal(original.images, shards.images) and np.array_equal(original.labels, shards.labels)
    code, out, _ = run_cli(capsys, "list", "--data-dir", root)
    assert "shards (.tar.gz, manifest)" in out and "test=4 train=12" in out


@pytest.mark.integration
def test_shared_verify_script_accepts_converted_shards(tmp_path):
    script = SHARED / "verify.py"
    if not script.is_file():
        pytest.skip(f"{script} not found")
    root = converted_toy(tmp_path)
    result = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "toy            train OK   samples=12" in result.stdout


def test_verify_reports_a_corrupt_shard_and_exits_non_zero(tmp_path, capsys):
    root = converted_toy(tmp_path)
    shard = root / "toy" / "toy-train-000001.tar.gz"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    capsys.readouterr()
    code, out, _ = run_cli(capsys, "verify", "--data-dir", root)
    assert code == 1
    assert "toy            train FAIL" in out and "toy-train-000001.tar.gz: size" not in out
    assert "toy-train-000001.tar.gz: sha256 mismatch" in out and "test  OK" in out
    assert out.rstrip().splitlines()[-1].startswith("FAILED")


def test_verify_flags_files_that_are_not_the_official_ones(tmp_path, capsys):
    write_fashion_mnist(tmp_path / "fashion_mnist", "test", n=5)
    code, out, _ = run_cli(capsys, "verify", "fashion_mnist", "--data-dir", tmp_path)
    assert code == 1
    assert "t10k-images-idx3-ubyte.gz: md5 differs from the official file's" in out
    assert "5 samples in test, official 10000" in out


@pytest.mark.integration
def test_verify_without_data_exits_non_zero_without_traceback(tmp_path):
    env = {**os.environ, "DACNN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-m", "dacnn", "data", "verify", "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "dacnn data: error:" in result.stderr and "no datasets found" in result.stderr
    assert "Traceback" not in result.stderr


class _Server:
    """A file server on 127.0.0.1 (loopback only) that counts requests."""

    def __init__(self, directory: Path) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *_args) -> None:
                outer.requests.append(self.path)

        handler = functools.partial(Handler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local mirror serving a small cifar-10-python.tar.gz, registered with its md5."""
    served = tmp_path / "served"
    write_cifar(served, "cifar10", n_train=10, n_test=5)
    archive = served / "cifar-10-python.tar.gz"
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    info = DATASETS["cifar10"]
    entry = OfficialFile(archive.name, "https://www.cs.toronto.edu/~kriz/" + archive.name, md5)
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(info, official_files=(entry,)))
    server = _Server(served)
    yield server, archive
    server.close()


def test_download_from_a_local_mirror_checks_md5_and_is_idempotent(tmp_path, capsys, mirror):
    server, archive = mirror
    data = tmp_path / "data"
    code, out, err = run_cli(capsys, "download", "cifar10", "--data-dir", data, "--base-url", server.url)
    assert code == 0, err
    assert (data / "cifar10" / archive.name).read_bytes() == archive.read_bytes()
    assert len(server.requests) == 1 and "md5 ok" in out
    assert load_dataset("cifar10", "test", data, cache=False).images.shape == (5, 32, 32, 3)
    code, out, _ = run_cli(capsys, "download", "cifar10", "--data-dir", data, "--base-url", server.url)
    assert code == 0 and "present, md5 ok" in out and len(server.requests) == 1
    assert sorted(p.name for p in (data / "cifar10").iterdir()) == [archive.name]


def test_download_with_a_wrong_checksum_or_a_missing_file_leaves_nothing(tmp_path, capsys, mirror,
                                                                          monkeypatch):
    server, archive = mirror
    monkeypatch.setenv("DACNN_DOWNLOAD_URL", server.url)  # the environment variable works as --base-url
    info = DATASETS["cifar10"]
    bad = dataclasses.replace(info.official_files[0], md5="0" * 32)
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(info, official_files=(bad,)))
    data = tmp_path / "data"
    code, _, err = run_cli(capsys, "download", "cifar10", "--data-dir", data)
    assert code == 2 and "does not match the published 000000" in err and "Traceback" not in err
    assert list((data / "cifar10").iterdir()) == [] and server.requests
    missing = dataclasses.replace(bad, filename="nope.tar.gz")
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(info, official_files=(missing,)))
    code, _, err = run_cli(capsys, "download", "cifar10", "--data-dir", data)
    assert code == 2 and "nope.tar.gz: download failed" in err
    assert list((data / "cifar10").iterdir()) == []


@pytest.mark.slow
def test_verify_passes_on_the_shared_data(capsys):
    if not (SHARED / "cifar10" / "MANIFEST.json").is_file():
        pytest.skip(f"real data not found at {SHARED}")
    code, out, _ = run_cli(capsys, "verify", "--data-dir", SHARED)
    assert code == 0, out
    assert "all OK: 130000 samples" in out


def test_convert_official_greyscale_files_to_shards(tmp_path, capsys):
    import json

    images, labels = write_fashion_mnist(tmp_path / "data" / "fashion_mnist", "test", n=7)
    data = tmp_path / "data"
    code, out, _ = run_cli(capsys, "convert", "fashion_mnist", "--data-dir", data, "--split", "test",
                           "--no-compress")
    assert code == 0 and "fashion_mnist/test: 7 samples -> 1 shards" in out
    ds_dir = tmp_path / "data" / "fashion_mnist"
    manifest = json.loads((ds_dir / "MANIFEST.json").read_text())
    assert manifest["image_shape"] == [28, 28] and manifest["image_mode"] == "L"
    assert manifest["splits"]["test"]["complete"] is False
    assert (ds_dir / "fashion_mnist-test-000000.tar").is_file()
    got = load_dataset("fashion_mnist", "test", tmp_path / "data", cache=False)  # now read from the shards
    assert np.array_equal(got.images, images) and np.array_equal(got.labels, labels)
    code, _, err = run_cli(capsys, "convert", "fashion_mnist", "--data-dir", data, "--split", "train")
    assert code == 2 and "no official files or image folder for split 'train'" in err
