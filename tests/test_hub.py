"""Pretrained weights (:mod:`dacnn.hub`, the pretrained names of :mod:`dacnn.registry`): the released
names and their table against the release manifest, how a tag configures a model, where the files are
looked for, and the release loaded bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

import dacnn
from dacnn import create_model, loading
from dacnn.analysis import evaluate as evaluation
from dacnn.data import DATASETS
from dacnn.data.synthetic import random_split
from dacnn.errors import CheckpointError
from dacnn.hub import find_weights, weights_dirs
from dacnn.importing import import_lrunet

RELEASED = ["lrunet_1x.cifar10_n1", "lrunet_1x.cifar10_n14", "lrunet_1x.fashion_mnist_n1",
            "lrunet_1x.fashion_mnist_n10", "lrunet_2x.cifar100_n1", "lrunet_2x.cifar100_n14"]
MANIFESTS = [d / "lrunet" / "MANIFEST.json" for d in weights_dirs()
             if (d / "lrunet" / "MANIFEST.json").is_file()]


def test_list_pretrained_names_the_six_releases() -> None:
    def released(pattern: str) -> list[str]:  # without the weights the project trained itself
        return [n for n in dacnn.list_pretrained(pattern)
                if not dacnn.registry.pretrained_cfg(n).file.startswith("trained/")]

    assert released("lrunet*") == RELEASED
    assert released("*fashion*") == RELEASED[2:4]
    cfg = dacnn.registry.pretrained_cfg("lrunet_1x.fashion_mnist_n10")
    kwargs = {"layer_reuse": 10, "in_chans": 1, "num_classes": 10}
    assert (cfg.dataset, cfg.accuracy, cfg.model_kwargs) == ("fashion_mnist", 93.46, kwargs)
    assert cfg.licence.startswith("MIT") and len(cfg.sha256) == 64 and "--pretrained" in cfg.command


@pytest.mark.skipif(not MANIFESTS, reason="no ../shared/reference/weights")
def test_table_agrees_with_the_release_manifest() -> None:
    files = json.loads(MANIFESTS[0].read_text())["files"]
    for name in RELEASED:
        cfg = dacnn.registry.pretrained_cfg(name)
        entry = files[cfg.file.removeprefix("lrunet/")]
        assert (cfg.sha256, cfg.dataset, cfg.accuracy) == (entry["sha256"], entry["dataset"],
                                                           entry["reported_test_accuracy"])
        assert cfg.model_kwargs["layer_reuse"] == entry["layer_reuse"]
        assert name.startswith(f"lrunet_{entry['width_mult']}x.")


def test_tag_sets_config_without_loading() -> None:
    model = create_model("lrunet_2x.cifar100_n14")
    assert (model.layer_reuse, model.num_classes, model.info.pretrained_tag) == (14, 100, "cifar100_n14")


@pytest.mark.parametrize("name", dacnn.list_pretrained())
def test_pretrained_info_says_how_the_weights_are_fed(name: str, monkeypatch) -> None:
    """``model.info`` of a tag: the dataset's channels, its image side (or the side the weights pad
    to), mean/std per channel (0/1: pixels / 255 as the release feeds them); the test loader of
    ``dacnn eval`` feeds exactly that size, and the model takes it."""
    cfg = dacnn.registry.pretrained_cfg(name)
    data = DATASETS[cfg.dataset]
    info = create_model(name).info
    side = cfg.pad_to or data.image_size[0]
    assert info.input_size == (data.channels, side, side) and info.num_classes == data.num_classes
    if cfg.normalize:
        assert info.mean in (None, data.mean) and info.std in (None, data.std)
    else:
        assert (info.mean, info.std) == ((0.0,) * data.channels, (1.0,) * data.channels)
    fake = random_split(cfg.dataset, "test", n=4, shape=data.image_size, num_classes=data.num_classes)
    monkeypatch.setattr(evaluation, "load_dataset", lambda *a, **k: fake)
    x, _ = next(iter(evaluation.test_loader(loading.pretrained_meta(name))))
    assert tuple(x.shape[1:]) == info.input_size
    model = create_model(name).eval()
    with torch.no_grad():
        assert model(x).shape == (4, data.num_classes)


def test_unknown_tag_and_model_without_weights_are_clear() -> None:
    with pytest.raises(KeyError, match="cifar10_n1, cifar10_n14"):
        create_model("lrunet_1x.svhn_n3", pretrained=True)
    with pytest.raises(KeyError, match="has no pretrained weights"):
        create_model("vgg16_1fc", pretrained=True)


def test_missing_or_altered_file_says_where_it_looked(tmp_path, monkeypatch) -> None:
    cfg = dacnn.registry.pretrained_cfg("lrunet_1x.fashion_mnist_n1")
    monkeypatch.setenv("DACNN_WEIGHTS", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=rf"{cfg.file}.*not found; looked in {tmp_path / 'given'}, "
                                              rf"{tmp_path / 'env'}"):
        find_weights(cfg, tmp_path / "given")
    altered = tmp_path / "given" / cfg.file
    altered.parent.mkdir(parents=True)
    altered.write_bytes(b"not the release")
    with pytest.raises(CheckpointError, match=f"expected {cfg.sha256}"):
        create_model("lrunet_1x.fashion_mnist_n1", pretrained=True, weights_dir=tmp_path / "given")
    assert weights_dirs(tmp_path / "given")[:2] == [tmp_path / "given", tmp_path / "env"]


@pytest.mark.skipif(not any((d / "lrunet").is_dir() for d in weights_dirs()), reason="no released weights")
def test_pretrained_loads_the_release_bit_for_bit() -> None:
    model = create_model("lrunet_1x.fashion_mnist_n1", pretrained=True)
    reference, meta = import_lrunet(find_weights(dacnn.registry.pretrained_cfg("lrunet_1x.fashion_mnist_n1")))
    assert meta["pretrained"] == "lrunet_1x.fashion_mnist_n1" and not model.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
