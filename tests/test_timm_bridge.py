"""``dacnn.timm_bridge.register()`` driven by timm itself: its registry, ``create_model``,
``resolve_model_data_config``, feature extraction, layer-wise lr decay and the Hub loader.

timm needs a torchvision that imports beside the project's torch, which the project's CPU build does
not have: where ``import timm`` fails every test here is skipped with the reason. The contract these
tests rely on is tested without timm in ``tests/test_models.py``.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from dacnn import SharedKernel, list_models, list_pretrained
from dacnn.data import DATASETS
from dacnn.hf_hub import save_pretrained

try:
    import timm
    import timm.data
    import timm.optim
except Exception as exc:  # ImportError, or torchvision failing to import beside this torch
    pytest.skip(f"timm does not import here ({type(exc).__name__}: {exc})", allow_module_level=True)

from dacnn import timm_bridge  # noqa: E402


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
