"""Dataset readers on the real shards and on small files in the official formats, the cache, bad input."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dacnn.data import DATASETS, find_source, get_data_dir, load_dataset
from dacnn.data import webdataset as wds
from dacnn.data.convert import write_shards
from dacnn.data.split import DatasetSplit
from dacnn.data.synthetic import (
    random_split,
    write_cifar,
    write_fashion_mnist,
    write_image_folder,
    write_svhn,
)
from dacnn.errors import DataError

SHARED = Path(os.environ.get("DACNN_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
needs_shared = pytest.mark.skipif(not (SHARED / "cifar10" / "MANIFEST.json").is_file(),
                                  reason=f"real data not found at {SHARED}")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DACNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DACNN_DATA_WORKERS", raising=False)


# ----------------------------------------------------------------------------- real shards

@needs_shared
def test_one_real_cifar10_shard_decodes_to_the_manifest():
    ds_dir = SHARED / "cifar10"
    manifest = wds.read_manifest(ds_dir)
    ref = wds.find_shards(ds_dir, "test", manifest)[0]
    data = wds.decode_shard(ref, wds.manifest_image_shape(manifest), 10)
    assert data.images.shape == (10000, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.keys[0] == "000000" and data.keys[-1] == "009999"
    assert np.bincount(data.labels, minlength=10).tolist() == [1000] * 10
    mean = data.images.reshape(-1, 3).mean(axis=0) / 255  # JPEG re-encoding moves it only slightly
    assert np.allclose(mean, DATASETS["cifar10"].mean, atol=0.01)


@needs_shared
def test_real_fashion_mnist_test_split_loads_and_is_then_cached(monkeypatch):
    split = load_dataset("fashion_mnist", "test", SHARED)
    assert split.images.shape == (10000, 28, 28, 1) and split.labels.dtype == np.int64
    assert split.classes[0] == "T-shirt/top" and split.class_counts().tolist() == [1000] * 10
    assert abs(split.images.mean() / 255 - DATASETS["fashion_mnist"].mean[0]) < 0.01
    assert abs(split.images.std() / 255 - DATASETS["fashion_mnist"].std[0]) < 0.01

    def no_decoding(*_args, **_kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr("dacnn.data.sources.decode_shards", no_decoding)
    again = load_dataset("fashion_mnist", "test", SHARED)
    assert np.array_equal(again.images, split.images) and np.array_equal(again.labels, split.labels)


# ----------------------------------------------------------------------------- official formats

def test_cifar10_archive_and_extracted_folder(tmp_path):
    wrote = write_cifar(tmp_path / "archive" / "cifar10", "cifar10", n_train=25, n_test=7)
    for root in (tmp_path / "archive", tmp_path / "folder"):
        if root.name == "folder":
            write_cifar(root / "cifar10", "cifar10", n_train=25, n_test=7, extracted=True)
        for split in ("train", "test"):
            got = load_dataset("cifar10", split, root, cache=False)
            assert np.array_equal(got.images, wrote[split][0]) and np.array_equal(got.labels, wrote[split][1])
            assert got.classes == list(DATASETS["cifar10"].classes)


def test_cifar100_fine_and_coarse_labels(tmp_path):
    wrote = write_cifar(tmp_path / "cifar100", "cifar100", n_train=30, n_test=12, seed=5)
    fine = load_dataset("cifar100", "train", tmp_path, cache=False)
    coarse = load_dataset("cifar100", "train", tmp_path, label_kind="coarse", cache=False)
    assert np.array_equal(fine.images, wrote["train"][0]) and np.array_equal(coarse.images, fine.images)
    assert np.array_equal(fine.labels, wrote["train"][1]) and fine.num_classes == 100
    assert np.array_equal(coarse.labels, wrote["train"][2]) and coarse.classes[3] == "coarse3"


@pytest.mark.integration
def test_svhn_mat_maps_label_10_to_digit_0(tmp_path):
    images, digits = write_svhn(tmp_path / "svhn", "test", n=23)
    got = load_dataset("svhn", "test", tmp_path, cache=False)
    assert np.array_equal(got.images, images) and np.array_equal(got.labels, digits)
    assert got.labels.min() == 0 and got.classes[0] == "0"


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_files(tmp_path, gz):
    images, labels = write_fashion_mnist(tmp_path / "fashion_mnist", "train", n=17, gz=gz)
    got = load_dataset("fashion_mnist", "train", tmp_path, cache=False)
    assert got.images.shape == (17, 28, 28, 1)
    assert np.array_equal(got.images, images) and np.array_equal(got.labels, labels)


@pytest.mark.parametrize("mode,fmt", [("RGB", "png"), ("L", "png"), ("L", "bmp")])
def test_image_folder(tmp_path, mode, fmt):
    images, labels = write_image_folder(tmp_path / "pets" / "train", mode=mode, fmt=fmt)
    got = load_dataset("pets", "train", tmp_path, cache=False)
    assert got.classes == ["cat", "dog", "fish"]
    assert np.array_equal(got.images, images) and np.array_equal(got.labels, labels)


def test_shards_are_preferred_over_official_files_and_read_back_exactly(tmp_path):
    wrote = write_cifar(tmp_path / "cifar10", "cifar10", n_train=12, n_test=5)
    assert find_source("cifar10", "train", tmp_path).kind == "cifar"
    split = load_dataset("cifar10", "train", tmp_path, cache=False)
    write_shards(split, tmp_path / "cifar10", "cifar10", shard_size=5, compress=False)
    source = find_source("cifar10", "train", tmp_path)
    assert source.kind == "shards" and len(source.files) == 3 and not source.has_manifest
    got = load_dataset("cifar10", "train", tmp_path, cache=False)
    assert np.array_equal(got.images, wrote["train"][0]) and np.array_equal(got.labels, wrote["train"][1])


def test_data_dir_argument_then_environment_then_default(monkeypatch, tmp_path):
    monkeypatch.setenv("DACNN_DATA", str(tmp_path / "env"))
    assert get_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert get_data_dir() == tmp_path / "env"
    monkeypatch.delenv("DACNN_DATA")
    assert get_data_dir() == Path("~/.cache/dacnn/data").expanduser()


# ----------------------------------------------------------------------------- cache

def test_cache_hit_and_invalidation_when_a_source_file_changes(tmp_path, monkeypatch):
    write_cifar(tmp_path / "cifar10", "cifar10", n_train=10, n_test=4, seed=1)
    first = load_dataset("cifar10", "train", tmp_path)
    entries = list((tmp_path / "cache" / "decoded").glob("*"))
    assert [p.suffix for p in entries] == [".npz"]  # no temporary files left behind
    calls = []
    real_read = __import__("dacnn.data.sources", fromlist=["read_cifar"]).read_cifar
    monkeypatch.setattr("dacnn.data.sources.read_cifar", lambda *a: calls.append(a) or real_read(*a))
    assert np.array_equal(load_dataset("cifar10", "train", tmp_path).images, first.images) and not calls
    changed = write_cifar(tmp_path / "cifar10", "cifar10", n_train=10, n_test=4, seed=2)
    second = load_dataset("cifar10", "train", tmp_path)
    assert len(calls) == 1 and np.array_equal(second.images, changed["train"][0])
    assert len(list((tmp_path / "cache" / "decoded").glob("cifar10-train-*.npz"))) == 1  # old entry dropped


def test_a_corrupt_cache_entry_is_decoded_again(tmp_path):
    write_fashion_mnist(tmp_path / "fashion_mnist", "test", n=9)
    first = load_dataset("fashion_mnist", "test", tmp_path)
    (entry,) = (tmp_path / "cache" / "decoded").glob("*.npz")
    entry.write_bytes(b"not a zip")
    assert np.array_equal(load_dataset("fashion_mnist", "test", tmp_path).images, first.images)


# ----------------------------------------------------------------------------- bad input

def make_shards(tmp_path: Path, n: int = 12, compress: bool = True) -> Path:
    """A small 'toy' dataset of shards with a manifest, as ``dacnn data convert`` writes it."""
    from dacnn.data.convert import convert

    write_image_folder(tmp_path / "src" / "toy" / "train", classes=("a", "b", "c"), per_class=n // 3,
                       size=(8, 8))
    convert("toy", tmp_path / "src", tmp_path / "data" / "toy", shard_size=5, compress=compress)
    return tmp_path / "data"


def shard_bytes(members: list[tuple[str, bytes]], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return gzip.compress(buf.getvalue()) if compress else buf.getvalue()


def png(size=(8, 8), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 7).save(buf, format="PNG")
    return buf.getvalue()


def load_toy(root: Path) -> DatasetSplit:
    return load_dataset("toy", "train", root, cache=False)


def test_missing_dataset_and_missing_split(tmp_path):
    with pytest.raises(DataError, match=r"cifar10.*not found.*dacnn data download cifar10"):
        load_dataset("cifar10", "train", tmp_path)
    write_fashion_mnist(tmp_path / "fashion_mnist", "train", n=5)
    with pytest.raises(DataError, match=r"no split 'test'.*found: train"):
        load_dataset("fashion_mnist", "test", tmp_path)


def test_missing_shard_file(tmp_path):
    root = make_shards(tmp_path)
    (root / "toy" / "toy-train-000001.tar.gz").unlink()
    with pytest.raises(DataError, match=r"toy-train-000001\.tar\.gz: file not found"):
        load_toy(root)


def test_sha256_mismatch(tmp_path):
    root = make_shards(tmp_path, compress=False)
    path = root / "toy" / "toy-train-000000.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"toy-train-000000\.tar: sha256 mismatch"):
        load_toy(root)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_shard(tmp_path, compress):
    members = [("000000.png", png()), ("000000.cls", b"1"), ("000001.png", png()), ("000001.cls", b"0")]
    data = shard_bytes(members, compress)
    path = tmp_path / "toy" / f"toy-train-000000.tar{'.gz' if compress else ''}"
    path.parent.mkdir()
    path.write_bytes(data[: len(data) // 2] if compress else data[:1500])  # cut inside the 2nd member
    with pytest.raises(DataError, match=r"toy-train-000000\.tar(\.gz)?: truncated"):
        load_toy(tmp_path)


def test_undecodable_image(tmp_path):
    path = tmp_path / "toy" / "toy-train-000000.tar"
    path.parent.mkdir()
    path.write_bytes(shard_bytes([("000000.png", png()), ("000000.cls", b"0"),
                                  ("000001.png", b"\x89PNG garbage"), ("000001.cls", b"1")]))
    message = r"toy-train-000000\.tar: sample '000001' \(000001\.png\) does not decode"
    with pytest.raises(DataError, match=message):
        load_toy(tmp_path)


def test_label_out_of_range(tmp_path):
    path = tmp_path / "toy" / "toy-train-000000.tar"
    path.parent.mkdir()
    (tmp_path / "toy" / "classes.txt").write_text("a\nb\n")
    path.write_bytes(shard_bytes([("000000.png", png()), ("000000.cls", b"1"),
                                  ("000001.png", png()), ("000001.cls", b"2")]))
    message = r"toy-train-000000\.tar: label 2 of sample 000001 out of range \[0, 2\)"
    with pytest.raises(DataError, match=message):
        load_toy(tmp_path)


def test_wrong_image_size(tmp_path):
    path = tmp_path / "toy" / "toy-train-000000.tar"
    path.parent.mkdir()
    path.write_bytes(shard_bytes([("000000.png", png()), ("000000.cls", b"0"),
                                  ("000001.png", png((8, 6))), ("000001.cls", b"1")]))
    with pytest.raises(DataError, match=r"image 000001\.png is \(6, 8, 3\), expected \(8, 8, 3\)"):
        load_toy(tmp_path)


def test_sample_without_label_and_empty_shard(tmp_path):
    path = tmp_path / "toy" / "toy-train-000000.tar"
    path.parent.mkdir()
    path.write_bytes(shard_bytes([("000000.png", png()), ("000000.cls", b"0"), ("000001.png", png())]))
    with pytest.raises(DataError, match="sample 000001 lacks its image or .cls"):
        load_toy(tmp_path)
    path.write_bytes(shard_bytes([]))
    with pytest.raises(DataError, match="no samples"):
        load_toy(tmp_path)


def test_empty_split_and_bad_arrays():
    with pytest.raises(DataError, match="empty"):
        DatasetSplit("toy", "train", np.zeros((0, 4, 4, 3), np.uint8), np.zeros(0, np.int64), ["a"])
    with pytest.raises(DataError, match="label 3 out of range"):
        DatasetSplit("toy", "train", np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 3]), ["a", "b"])
    with pytest.raises(DataError, match="uint8"):
        DatasetSplit("toy", "train", np.zeros((2, 4, 4, 3), np.float32), np.array([0, 1]), ["a", "b"])


def test_image_folder_with_a_wrong_size_or_no_images(tmp_path):
    write_image_folder(tmp_path / "pets" / "train", size=(8, 8))
    Image.new("RGB", (9, 8)).save(tmp_path / "pets" / "train" / "dog" / "odd.png")
    with pytest.raises(DataError, match=r"dog/odd\.png: image is 9x8, expected 8x8"):
        load_dataset("pets", "train", tmp_path, cache=False)
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="not found"):
        load_dataset("empty", "train", tmp_path, cache=False)


def test_corrupt_and_hostile_cifar_pickles(tmp_path):
    ds_dir = tmp_path / "cifar10"
    write_cifar(ds_dir, "cifar10", extracted=True)
    batch = ds_dir / "cifar-10-batches-py" / "test_batch"

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    batch.write_bytes(pickle.dumps({b"data": Exploit()}, protocol=2))
    with pytest.raises(DataError, match=r"test_batch: not a readable CIFAR pickle.*not allowed"):
        load_dataset("cifar10", "test", tmp_path, cache=False)
    archive_dir = tmp_path / "archive" / "cifar10"
    write_cifar(archive_dir, "cifar10")
    archive = archive_dir / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: truncated or corrupt"):
        load_dataset("cifar10", "train", tmp_path / "archive", cache=False)


@pytest.mark.integration
def test_bad_svhn_and_idx_files(tmp_path):
    import scipy.io

    (tmp_path / "svhn").mkdir()
    scipy.io.savemat(tmp_path / "svhn" / "train_32x32.mat",
                     {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [11]], np.uint8)})
    with pytest.raises(DataError, match=r"train_32x32\.mat: label 11 at index 1 out of range"):
        load_dataset("svhn", "train", tmp_path, cache=False)
    write_fashion_mnist(tmp_path / "fashion_mnist", "test", n=4, gz=False)
    images = tmp_path / "fashion_mnist" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: .*data bytes"):
        load_dataset("fashion_mnist", "test", tmp_path, cache=False)
    images.write_bytes(b"\x00\x00\x0d\x03" + bytes(100))
    with pytest.raises(DataError, match="not an unsigned-byte IDX"):
        load_dataset("fashion_mnist", "test", tmp_path, cache=False)


def test_random_split_helper_is_valid():
    split = random_split(n=30, num_classes=3)
    assert split.class_counts().tolist() == [10, 10, 10]


def test_tar_parser_follows_long_names_and_needs_an_end_marker(tmp_path):
    from dacnn.data.tar_io import tar_members

    long_dir = "d" * 120
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, payload in ((f"{long_dir}/000000.png", png()), (f"{long_dir}/000000.cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        names = [name for name, _ in tar_members(buf.getvalue(), tmp_path / "x.tar")]
        assert names == [f"{long_dir}/000000.png", f"{long_dir}/000000.cls"]
    plain = shard_bytes([("000000.cls", b"1")])
    with pytest.raises(DataError, match="no end-of-archive marker"):
        tar_members(plain[:1024], tmp_path / "x.tar")
    corrupt = bytearray(plain)
    corrupt[0] ^= 1  # a name byte changes, the header checksum no longer matches
    with pytest.raises(DataError, match="checksum mismatch"):
        tar_members(bytes(corrupt), tmp_path / "x.tar")
