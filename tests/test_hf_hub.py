"""``save_pretrained`` / ``from_pretrained`` (:mod:`dacnn.hf_hub`): every registered model round-trips
bitwise with its sharing kept; the Hub case reads a Hugging Face cache made here, offline, with every
socket refused."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import dacnn
from _helpers import small_input, small_model
from dacnn import AnchoredConv2d, SharedKernel, create_model, list_models
from dacnn.errors import CheckpointError
from dacnn.hf_hub import CONFIG_NAME, WEIGHTS_NAME, from_pretrained, hub_name, save_pretrained

MODELS = list_models()


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("tests/test_hf_hub.py: no network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _kernels_used(model: torch.nn.Module) -> bool:
    """Every use applies a kernel the model owns (registered under its ``kernels``), by identity."""
    owned = {id(m) for m in model.modules() if isinstance(m, SharedKernel)}
    return all(id(m.kernel) in owned for m in model.modules() if isinstance(m, AnchoredConv2d))


def _assert_same(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert dacnn.count_params(b) == dacnn.count_params(a)  # unique, per-use and the shared tensors
    assert _kernels_used(b)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("name", MODELS)
def test_round_trip_is_bitwise_with_sharing_kept(name: str, tmp_path: Path) -> None:
    model = small_model(name)
    x = small_input(model)
    with torch.no_grad():
        model.train()(x)  # BatchNorm statistics that differ from the init's
    folder = model.save_pretrained(tmp_path / name)
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        assert sorted(f.keys()) == sorted(model.state_dict())  # each shared tensor stored once
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["architecture"] == hub_name(name) == config["pretrained_cfg"]["architecture"]
    assert config["num_classes"] == model.num_classes and config["model_args"] == model.info.model_kwargs
    assert tuple(config["pretrained_cfg"]["input_size"]) == model.pretrained_cfg["input_size"]
    loaded = from_pretrained(folder)
    assert type(loaded) is type(model) and loaded.pretrained_cfg["architecture"] == name
    _assert_same(model, loaded, x)


def test_plug_in_sharing_and_a_new_head_are_rebuilt(tmp_path: Path) -> None:
    model = create_model("resnet18", width=4, share_budget="ratio=0.5")
    model.reset_classifier(7, "max")
    assert dacnn.count_params(model).shared
    loaded = from_pretrained(save_pretrained(model, tmp_path / "m"))
    assert loaded.num_classes == 7 and loaded.global_pool == "max"
    _assert_same(model, loaded, torch.randn(2, 3, 32, 32))


def test_a_tagged_model_keeps_its_input(tmp_path: Path) -> None:
    model = create_model("lrunet_1x.fashion_mnist_n10", layer_reuse=2)  # the tag's config, no weights
    loaded = from_pretrained(save_pretrained(model, tmp_path / "m"))
    assert loaded.pretrained_cfg["input_size"] == (1, 28, 28) and loaded.pretrained_cfg["mean"] == (0.0,)
    _assert_same(model, loaded, torch.randn(2, 1, 28, 28))


def test_what_cannot_be_rebuilt_is_refused(tmp_path: Path) -> None:
    pruned = small_model("dacnn18")
    pruned.prune_intermediate_layers([0, 1])
    with pytest.raises(CheckpointError, match="pruned or features-only"):
        save_pretrained(pruned, tmp_path / "a")
    with pytest.raises(CheckpointError, match="not built by dacnn.create_model"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "b")


def test_bad_folders_are_errors_with_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable JSON config"):
        from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"architecture": "timm_resnet50"}))
    with pytest.raises(CheckpointError, match="no dacnn model"):
        from_pretrained(tmp_path)
    save_pretrained(small_model("dacnn14"), tmp_path / "m")
    config = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    config["model_args"]["width"] = 8  # the weights no longer fit
    (tmp_path / "m" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not match|cannot load"):
        from_pretrained(tmp_path / "m")


# ---------------------------------------------------------------- the Hub, offline
def _hub_cache(root: Path, repo: str, folder: Path, revision: str = "0" * 40) -> Path:
    """A Hugging Face cache holding ``folder``'s files as repository ``repo`` at ``main``: the layout
    ``models--<org>--<name>/refs/main`` + ``snapshots/<commit>/<file>`` huggingface_hub reads."""
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(revision)
    snapshot = base / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    return root


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch):
    constants = pytest.importorskip("huggingface_hub.constants",
                                    reason="the Hub case needs huggingface_hub (pip install 'dacnn[hub]')")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return constants


def test_from_the_hub_cache_offline(offline_hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_model("dacnn18_mix_reg")
    cache = _hub_cache(tmp_path / "cache", "someone/dacnn18-mix-reg", save_pretrained(model, tmp_path / "m"))
    loaded = from_pretrained("hf-hub:someone/dacnn18-mix-reg", cache_dir=cache)
    assert loaded.pretrained_cfg["hf_hub_id"] == "someone/dacnn18-mix-reg"
    _assert_same(model, loaded, small_input(model))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # the cache found through the environment
    monkeypatch.setattr(offline_hub, "HF_HUB_CACHE", str(cache))
    _assert_same(model, from_pretrained("hf-hub:someone/dacnn18-mix-reg@main"), small_input(model))


def test_a_repo_missing_from_the_offline_cache_is_an_error(offline_hub, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="hf-hub:someone/absent: cannot get config.json"):
        from_pretrained("hf-hub:someone/absent", cache_dir=tmp_path)
