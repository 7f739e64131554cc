"""``dacnn.timm_bridge.register()`` driven by timm itself: its registry, ``create_model``,
``resolve_model_data_config``, feature extraction, layer-wise lr decay, the Hub loader, and timm's own
``train.py`` training and resuming a dacnn model through ``scripts/timm-train``.

timm needs a torchvision that imports beside the project's torch, which the project's CPU build does
not have: where ``import timm`` fails every test here is skipped with the reason (tests/README.md says
how to make an environment where they run). timm's ``train.py`` is not in timm's package: its test runs
the one named by ``$DACNN_TIMM_TRAIN_PY`` and skips without it. The contract these tests rely on is
tested without timm in ``tests/test_models.py``.
"""

from __future__ import annotations

import csv
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dacnn import SharedKernel, count_params, list_models, list_pretrained
from dacnn.data import DATASETS
from dacnn.hf_hub import save_pretrained

try:
    import timm
    import timm.data
    import timm.optim
except Exception as exc:  # ImportError, or torchvision failing to import beside this torch
    pytest.skip(f"timm does not import here ({type(exc).__name__}: {exc})", allow_module_level=True)

from dacnn import timm_bridge  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "scripts" / "timm-train"
TRAIN_PY_ENV = "DACNN_TIMM_TRAIN_PY"


@pytest.fixture(scope="module", autouse=True)
def registered() -> list[str]:
    return timm_bridge.register()


def test_every_model_and_tag_is_registered_under_the_prefix_without_shadowing_timm() -> None:
    ours = [timm_bridge.timm_name(n) for n in list_models()]
    assert set(ours) <= set(timm.list_models("dacnn_*"))
    assert timm_bridge.register() == []  # a second call adds nothing
    assert {timm_bridge.timm_name(n) for n in list_pretrained()} <= set(timm.list_pretrained("dacnn_*"))
    assert timm.models.get_pretrained_cfg("resnet18").input_size == (3, 224, 224)  # timm's own, untouched
    assert timm.models._registry._model_to_module["resnet18"] == "resnet"


def test_create_model_with_train_pys_arguments_and_the_data_config() -> None:
    model = timm.create_model("dacnn_dacnn14", pretrained=False, num_classes=10, in_chans=3, drop_rate=0.0,
                              drop_path_rate=None, global_pool=None, width=4)
    config = timm.data.resolve_model_data_config(model)
    assert config["input_size"] == (3, 32, 32) and config["crop_pct"] == 1.0
    cifar10 = DATASETS["cifar10"]
    assert tuple(config["mean"]) == cifar10.mean and tuple(config["std"]) == cifar10.std
    assert model.pretrained_cfg["architecture"] == "dacnn_dacnn14"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_pretrained_tag_carries_its_input() -> None:
    model = timm.create_model("dacnn_lrunet_1x.fashion_mnist_n10")  # the tag's config, no weights
    config = timm.data.resolve_model_data_config(model)
    assert config["input_size"] == (1, 28, 28) and tuple(config["mean"]) == (0.0,)


def test_features_only() -> None:
    net = timm.create_model("dacnn_resnet18", width=4, features_only=True, out_indices=(1, 3))
    maps = net(torch.randn(2, 3, 32, 32))
    assert [m.shape[1] for m in maps] == net.feature_info.channels() == [4, 16]


def test_layer_decay_puts_a_shared_kernel_in_one_group() -> None:
    model = timm.create_model("dacnn_dacnn18_mix", width=4)
    optimizer = timm.optim.create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=1e-4, layer_decay=0.5)
    seen = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each tensor in one group
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    first_use_bn = model.stages[1][1].bn1.weight  # stage 2's first use of kernels["8"]
    assert isinstance(model.kernels["8"], SharedKernel)
    assert scale[id(model.kernels["8"].weight)] == scale[id(first_use_bn)]
    assert scale[id(model.stem[0].weight)] < scale[id(model.kernels["8"].weight)] < scale[id(model.fc.weight)]


def test_timm_loads_a_saved_model_from_an_offline_hub_cache(tmp_path: Path, monkeypatch) -> None:
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(socket.socket, "connect", lambda *a: (_ for _ in ()).throw(OSError("no network")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = timm.create_model("dacnn_dacnn18", width=4)
    folder = save_pretrained(model, tmp_path / "saved")
    revision = "1" * 40
    base = tmp_path / "cache" / "models--someone--dacnn18"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(revision)
    (base / "snapshots" / revision).mkdir(parents=True)
    for f in folder.iterdir():
        (base / "snapshots" / revision / f.name).write_bytes(f.read_bytes())
    loaded = timm.create_model("hf-hub:someone/dacnn18", pretrained=True, cache_dir=tmp_path / "cache")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def _image_folder(root: Path, classes: int = 10, train: int = 10, validation: int = 3) -> Path:
    """``root/{train,validation}/<class>/<i>.png``: 32x32 noise around one colour per class."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(classes, 3))
    for split, n in (("train", train), ("validation", validation)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(colours[c] + rng.normal(0, 40, size=(32, 32, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def _timm_train(train_py: str, data: Path, output: Path, *args: str) -> str:
    """``scripts/timm-train`` on dacnn_dacnn14 with the arguments a timm user passes on a CPU; its output.
    One loader worker: timm up to 1.0.28 asks for persistent workers, which PyTorch refuses with none."""
    argv = [sys.executable, str(LAUNCHER), "--train-py", train_py, "--data-dir", str(data),
            "--model", "dacnn_dacnn14", "--num-classes", "10", "--input-size", "3", "32", "32",
            "--batch-size", "32", "--opt", "sgd", "--lr", "0.05", "--warmup-epochs", "0", "--workers", "1",
            "--no-prefetcher", "--device", "cpu", "--output", str(output), "--experiment", "run", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                      os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return log


def _summary_epochs(run: Path) -> list[int]:
    lines = [line for line in (run / "summary.csv").read_text().splitlines() if line]
    header = lines[0]  # train.py versions before 1.0.29 write the header again on a resume
    return [int(r["epoch"]) for r in csv.DictReader([header, *(x for x in lines if x != header)])]


@pytest.mark.integration
def test_timms_train_py_trains_and_resumes_a_dacnn_model(tmp_path: Path) -> None:
    train_py = os.environ.get(TRAIN_PY_ENV)
    if not train_py or not Path(train_py).is_file():
        pytest.skip(f"${TRAIN_PY_ENV} names no file: timm's train.py (from timm's repository, the version "
                    f"of the installed timm {timm.__version__}) is needed")
    fresh = timm.create_model("dacnn_dacnn14", num_classes=10)
    before = count_params(fresh)
    data, out = _image_folder(tmp_path / "data"), tmp_path / "out"
    run = out / "run"

    log = _timm_train(train_py, data, out, "--epochs", "2")
    assert f"dacnn_dacnn14 created, param count:{before.unique}" in log  # the kernel counted once
    assert _summary_epochs(run) == [0, 1]

    log = _timm_train(train_py, data, out, "--epochs", "3", "--resume", str(run / "last.pth.tar"))
    assert re.search(r"Loaded checkpoint '.*last\.pth\.tar' \(epoch 1\)", log), log[-4000:]
    assert f"dacnn_dacnn14 created, param count:{before.unique}" in log
    assert _summary_epochs(run) == [0, 1, 2]  # it went on from epoch 2, not from 0

    # what train.py's resume did, on a fresh model: the kernel is still one shared parameter
    model = timm.create_model("dacnn_dacnn14", num_classes=10)
    optimizer = timm.optim.create_optimizer_v2(model, "sgd", lr=0.05, weight_decay=2e-5)  # train.py's groups
    assert timm.models.resume_checkpoint(model, str(run / "last.pth.tar"), optimizer=optimizer) == 3
    kernels = [m for m in model.modules() if isinstance(m, SharedKernel)]
    assert len(kernels) == 1
    assert [p is kernels[0].weight for p in model.parameters()].count(True) == 1
    after = count_params(model)
    assert (after.unique, after.per_use, after.shared) == (before.unique, before.per_use, before.shared)
    assert "momentum_buffer" in optimizer.state[kernels[0].weight]
    epoch1 = timm.models.load_state_dict(str(run / "checkpoint-1.pth.tar"))
    assert not torch.equal(epoch1["kernels.anchor.weight"], kernels[0].weight)  # epoch 2 trained it
