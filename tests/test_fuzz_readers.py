"""Fuzz every reader of outside bytes: each input loads or raises a DacnnError.

Inputs are valid files in each format (written by :mod:`dacnn.data.synthetic` and the project's
own writers, so no ``../shared`` is needed) mutated by hypothesis: bytes replaced, cut, inserted,
or random bytes; compressed formats are also mutated inside the compression. Any other exception
fails the test, and so does an input taking longer than ``HANG_S`` seconds (a hang).

``DACNN_FUZZ_EXAMPLES`` (default 40) sets the inputs per reader, so CI time stays bounded;
``DACNN_FUZZ_RANDOM=1`` explores new inputs instead of the fixed (derandomized) sequence. The
counts tried per reader are printed at the end (``pytest -s``) and written as JSON to
``$DACNN_FUZZ_REPORT`` when set.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dacnn import checkpoint as ckpt
from dacnn import create_model
from dacnn.compact_format import load_exported
from dacnn.data.imagefolder import read_image_folder
from dacnn.data.official import read_cifar, read_fashion_mnist, read_svhn
from dacnn.data.synthetic import idx_bytes, write_cifar, write_image_folder, write_svhn
from dacnn.data.webdataset import ShardRef, decode_shard, read_manifest
from dacnn.errors import DacnnError
from dacnn.export.compact import export_safetensors
from dacnn.export.inspect import inspect_file
from dacnn.importing import import_lrunet
from dacnn.train.config import TrainConfig, config_from_dict, dump_yaml, load_yaml

EXAMPLES = int(os.environ.get("DACNN_FUZZ_EXAMPLES", "40"))
HANG_S = 20
TRIED: Counter[str] = Counter()
REFUSED: Counter[str] = Counter()
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=os.environ.get("DACNN_FUZZ_RANDOM") != "1",
                suppress_health_check=list(HealthCheck))
SHARED = Path(__file__).resolve().parents[2] / "shared"


class _Hang(BaseException):  # not an Exception: a reader's `except Exception` cannot swallow it
    pass


@contextmanager
def _time_limit(seconds: int):
    def alarm(signum, frame):
        raise _Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _survives(reader: str, call: Callable[[], object]) -> None:
    """Run one input: loading or a DacnnError is fine; anything else propagates and fails."""
    TRIED[reader] += 1
    with _time_limit(HANG_S):
        try:
            call()
        except DacnnError:
            REFUSED[reader] += 1


def _mutations(base: bytes) -> st.SearchStrategy[bytes]:
    n = len(base)

    def edit(changes: list[tuple[int, int]]) -> bytes:
        data = bytearray(base)
        for pos, value in changes:
            data[pos % n] = value
        return bytes(data)

    return st.one_of(
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8).map(edit),
        st.integers(0, n - 1).map(lambda cut: base[:cut]),
        st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=64)).map(
            lambda t: base[: t[0]] + t[1] + base[t[0]:]),
        st.binary(max_size=512),
    )


def _gz_mutations(raw: bytes) -> st.SearchStrategy[bytes]:
    """Mutations of the compressed file and of its content (then compressed again)."""
    return st.one_of(_mutations(gzip.compress(raw, mtime=0)), _mutations(raw).map(lambda b: gzip.compress(b)))


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    report = {name: {"tried": TRIED[name], "refused": REFUSED[name], "loaded": TRIED[name] - REFUSED[name]}
              for name in sorted(TRIED)}
    total = sum(TRIED.values())
    print(f"\nfuzz: {total} inputs tried over {len(TRIED)} readers, none raised a foreign exception or hung")
    for name, row in report.items():
        print(f"  {name:28s} {row['tried']:5d} tried, {row['refused']:5d} refused, {row['loaded']:5d} loaded")
    if os.environ.get("DACNN_FUZZ_REPORT"):
        Path(os.environ["DACNN_FUZZ_REPORT"]).write_text(json.dumps({"total": total, "readers": report},
                                                                    indent=1) + "\n")


def _tmpdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="dacnn-fuzz-")


# ---------------------------------------------------------------- data formats


def _png(seed: int, mode: str = "RGB") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr if mode == "RGB" else arr[:, :, 0], mode).save(buf, format="PNG")
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


SHARD = _tar([m for i in range(3) for m in ((f"{i:06d}.png", _png(i)), (f"{i:06d}.cls", str(i).encode()))])


@FUZZ
@given(data=st.one_of(_mutations(SHARD), _gz_mutations(SHARD).map(lambda b: b"GZ" + b)))
def test_webdataset_shards(data):
    compressed = data.startswith(b"GZ")
    with _tmpdir() as tmp:
        path = Path(tmp) / ("toy-train-000000.tar.gz" if compressed else "toy-train-000000.tar")
        path.write_bytes(data[2:] if compressed else data)
        _survives("webdataset shard", lambda: decode_shard(ShardRef(path), num_classes=10))


MANIFEST = json.dumps({"name": "toy", "classes": ["a", "b"], "image_shape": [8, 8, 3],
                       "splits": {"train": {"num_samples": 3, "shards": [
                           {"file": "toy-train-000000.tar", "sha256": "0" * 64, "num_samples": 3}]}}},
                      indent=1).encode()


@FUZZ
@given(data=_mutations(MANIFEST))
def test_shard_manifests(data):
    with _tmpdir() as tmp:
        (Path(tmp) / "MANIFEST.json").write_bytes(data)
        _survives("shard MANIFEST.json", lambda: read_manifest(Path(tmp)))


def _cifar_archive() -> bytes:
    with _tmpdir() as tmp:
        write_cifar(Path(tmp), n_train=5, n_test=5)
        return gzip.decompress((Path(tmp) / "cifar-10-python.tar.gz").read_bytes())


CIFAR = _cifar_archive()


@FUZZ
@given(data=_gz_mutations(CIFAR))
def test_cifar_python_archives(data):
    with _tmpdir() as tmp:
        path = Path(tmp) / "cifar-10-python.tar.gz"
        path.write_bytes(data)
        _survives("CIFAR python archive", lambda: read_cifar(path, "cifar10", "train"))


IDX_IMAGES = idx_bytes(np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8))
IDX_LABELS = idx_bytes(np.arange(4, dtype=np.uint8))


@FUZZ
@given(images=st.one_of(st.just(IDX_IMAGES), _mutations(IDX_IMAGES), _gz_mutations(IDX_IMAGES)),
       labels=st.one_of(st.just(IDX_LABELS), _mutations(IDX_LABELS)))
def test_fashion_mnist_idx(images, labels):
    with _tmpdir() as tmp:
        img, lbl = Path(tmp) / "train-images-idx3-ubyte", Path(tmp) / "train-labels-idx1-ubyte"
        img.write_bytes(images)
        lbl.write_bytes(labels)
        _survives("Fashion-MNIST IDX", lambda: read_fashion_mnist(img, lbl))


def _svhn_mat() -> bytes:
    pytest.importorskip("scipy")
    with _tmpdir() as tmp:
        write_svhn(Path(tmp), "train", n=4)
        return (Path(tmp) / "train_32x32.mat").read_bytes()


@pytest.mark.integration
@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))  # a reader process per input
@given(data=st.data())
def test_svhn_mat(data):
    base = _svhn_cached()
    payload = data.draw(_mutations(base))
    with _tmpdir() as tmp:
        path = Path(tmp) / "train_32x32.mat"
        path.write_bytes(payload)
        _survives("SVHN .mat", lambda: read_svhn(path))


_SVHN: list[bytes] = []


def _svhn_cached() -> bytes:
    if not _SVHN:
        _SVHN.append(_svhn_mat())
    return _SVHN[0]


PNG_FILE = _png(5)


@FUZZ
@given(data=_mutations(PNG_FILE), name=st.sampled_from(["002.png", "002.jpg", "002.gif"]))
def test_image_folders(data, name):
    with _tmpdir() as tmp:
        root = Path(tmp) / "train"
        write_image_folder(root, classes=("cat", "dog"), per_class=2, size=(8, 8))
        (root / "dog" / name).write_bytes(data)
        _survives("image folder", lambda: read_image_folder(root))


# ---------------------------------------------------------------- checkpoints and exports


def _tiny():
    torch.manual_seed(0)
    return create_model("dacnn", depth=4, width=8, num_classes=10)


TINY_META = {"model": "dacnn", "model_kwargs": {"depth": 4, "width": 8, "num_classes": 10}}


def _weights_files() -> tuple[bytes, bytes]:
    with _tmpdir() as tmp:
        path = ckpt.save_weights(_tiny(), Path(tmp) / "m.safetensors", TINY_META)
        return path.read_bytes(), ckpt.sidecar_path(path).read_bytes()


WEIGHTS, SIDECAR = _weights_files()


@FUZZ
@given(weights=st.one_of(st.just(WEIGHTS), _mutations(WEIGHTS)),
       sidecar=st.one_of(st.just(SIDECAR), _mutations(SIDECAR), st.none()))
def test_weights_files_with_sidecars(weights, sidecar):
    with _tmpdir() as tmp:
        path = Path(tmp) / "m.safetensors"
        path.write_bytes(weights)
        if sidecar is not None:
            ckpt.sidecar_path(path).write_bytes(sidecar)
        _survives("weights + sidecar", lambda: ckpt.load_model_file(path))


def _state_file() -> bytes:
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = {"format": ckpt.STATE_FORMAT, "epoch": 0, "batches_done": 1, "epoch_done": False,
             "global_step": 1, "optimizer": opt.state_dict(), "rng": ckpt.capture_rng(),
             "best": {"val_acc": None, "epoch": None}, "config": TrainConfig(model="dacnn").to_dict(),
             "weights": "e0000-s00000001.safetensors", "ema_weights": None}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


STATE = _state_file()


@FUZZ
@given(data=_mutations(STATE))
def test_training_states(data):
    with _tmpdir() as tmp:
        path = Path(tmp) / "e0000-s00000001.state.pt"
        path.write_bytes(data)
        _survives("training state", lambda: ckpt.load_state(path))


POINTER = json.dumps({"version": "e0000-s00000001", "state": "e0000-s00000001.state.pt",
                      "weights": "e0000-s00000001.safetensors", "eval_weights": "e0000-s00000001.safetensors",
                      "epoch": 0, "batches_done": 1, "epoch_done": False, "global_step": 1}).encode()


@FUZZ
@given(pointer=_mutations(POINTER), state=st.one_of(st.just(STATE), _mutations(STATE)))
def test_checkpoint_directories(pointer, state):
    """``last.json`` + state + weights, as ``--resume`` and ``eval --which last`` read them."""
    with _tmpdir() as tmp:
        d = Path(tmp)
        (d / "last.json").write_bytes(pointer)
        (d / "e0000-s00000001.state.pt").write_bytes(state)
        (d / "e0000-s00000001.safetensors").write_bytes(WEIGHTS)
        _survives("checkpoint directory", lambda: ckpt.newest_valid(d, "last"))


def _export() -> bytes:
    with _tmpdir() as tmp:
        path = Path(tmp) / "m-int8.safetensors"
        export_safetensors(_tiny(), path, "int8", model_name="dacnn", model_kwargs=TINY_META["model_kwargs"])
        return path.read_bytes()


EXPORT = _export()


@FUZZ
@given(data=_mutations(EXPORT))
def test_compact_exports(data):
    with _tmpdir() as tmp:
        path = Path(tmp) / "m-int8.safetensors"
        path.write_bytes(data)
        _survives("compact export (load)", lambda: load_exported(path))
        _survives("compact export (inspect)", lambda: inspect_file(path))


def _released() -> bytes:
    """A released LruNet ``.t7`` (``../shared``), else one in the same layout from our model."""
    candidates = sorted((SHARED / "reference" / "weights" / "lrunet").glob("fashionmnist-lru1-*.t7"))
    if candidates:
        return candidates[0].read_bytes()
    buf = io.BytesIO()
    torch.save({"net": {"features.0.weight": torch.zeros(32, 1, 3, 3),
                        "stage1.dw.weight": torch.zeros(128, 1, 3, 3),
                        "classifier.4.weight": torch.zeros(10, 64)}, "acc": 90.0, "epoch": 3}, buf)
    return buf.getvalue()


RELEASED = _released()


@FUZZ
@given(data=_mutations(RELEASED))
def test_released_weights(data):
    with _tmpdir() as tmp:
        path = Path(tmp) / "fashionmnist-lru1-ckpt.t7"
        path.write_bytes(data)
        _survives("released LruNet .t7", lambda: import_lrunet(path, verify=False))


# ---------------------------------------------------------------- YAML configs


CONFIG = dump_yaml(TrainConfig(model="dacnn", dataset="fashion_mnist", lr_milestones=[3, 6])).encode()


def _config(path: Path) -> None:
    config_from_dict(load_yaml(path), source=str(path))


@FUZZ
@given(data=st.one_of(_mutations(CONFIG), st.text(max_size=200).map(str.encode),
                      st.dictionaries(st.sampled_from(sorted(TrainConfig.__dataclass_fields__)),
                                      st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                                st.text(max_size=5), st.lists(st.floats(), max_size=3)),
                                      max_size=4).map(lambda d: yaml.safe_dump(d).encode())))
def test_yaml_configs(data):
    with _tmpdir() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(data)
        _survives("YAML config", lambda: _config(path))


_ONNX: list[bytes] = []


def _onnx_file() -> bytes:
    """A small ONNX export of the tiny DACNN (made once, on first use)."""
    if not _ONNX:
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
        from dacnn.export.onnx_export import export_onnx

        with _tmpdir() as tmp:
            path = Path(tmp) / "m.onnx"
            export_onnx(_tiny(), path, input_size=(3, 32, 32))
            _ONNX.append(path.read_bytes())
    return _ONNX[0]


@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))
@given(data=st.data())
def test_onnx_exports(data):
    from dacnn.export.onnx_export import OnnxRuntimeModel

    payload = data.draw(_mutations(_onnx_file()))
    with _tmpdir() as tmp:
        path = Path(tmp) / "m.onnx"
        path.write_bytes(payload)
        _survives("ONNX export (inspect)", lambda: inspect_file(path))
        _survives("ONNX export (onnxruntime)", lambda: OnnxRuntimeModel(path)(torch.zeros(1, 3, 32, 32)))
