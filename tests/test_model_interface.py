"""Generic tests over every registered model (issue 10): timm's interface, ``ModelInfo``, hooks that
see every use of a shared kernel, activation maximisation on every family, and pretrained names.

Models are built small (``SMALL`` per family) so the whole file stays fast; a family registered later
without an entry in ``SMALL`` fails :func:`test_every_family_has_a_small_config`.
"""

from __future__ import annotations

import json

import pytest
import torch

import dacnn
from dacnn import AnchoredConv2d, create_model, list_models, loading, model_info
from dacnn.analysis import evaluate as evaluation
from dacnn.analysis.activation_max import activation_maximisation, visualised_layers
from dacnn.data import DATASETS
from dacnn.data.synthetic import random_split
from dacnn.errors import CheckpointError
from dacnn.hub import find_weights, weights_dirs

# family -> (builder kwargs that keep the model small, input side): named variants fix their depth and
# width, so the families without a width argument run on small images instead.
SMALL: dict[str, tuple[dict, int | None]] = {
    "airbench": ({"width": 4}, None),
    "convmixer": ({}, 8),
    "dacnn": ({"width": 4}, None),
    "lrunet": ({"layer_reuse": 2}, None),
    "resnet": ({"width": 4}, None),
    "se_resnet": ({}, 8),
    "sharesnet": ({}, 8),
    "vgg": ({"width": 8}, None),
}
MODELS = list_models()


def small(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, **SMALL[model_info(name).family][0], **kwargs)


def input_size(model: torch.nn.Module) -> tuple[int, int, int]:
    chans, height, width = model.info.input_size
    side = SMALL[model.info.family][1]
    return (chans, side, side) if side else (chans, height, width)


def _x(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *input_size(model), generator=torch.Generator().manual_seed(1))


def test_every_family_has_a_small_config() -> None:
    assert {model_info(n).family for n in MODELS} <= set(SMALL)


@pytest.mark.parametrize("name", MODELS)
def test_timm_interface(name: str) -> None:
    model = small(name).eval()
    x = _x(model)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats), out, rtol=0, atol=0)
        pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape[:2] == (2, model.head_hidden_size) and feats.shape[1] == model.num_features
    assert model.num_classes == model.info.num_classes == out.shape[1]
    info = model.info
    assert model.get_classifier() is model.get_submodule(info.classifier)
    first = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d | AnchoredConv2d))
    assert info.first_conv == first
    assert len(info.input_size) == 3 and (info.mean is None) == (info.std is None)
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (2, 5) and model.num_classes == 5
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.head_hidden_size)


@pytest.mark.parametrize("name", MODELS)
def test_one_name_for_the_classifier_and_for_the_kernels_owner(name: str) -> None:
    """Every family: the classifier is ``model.fc``; every shared kernel sits in a ``kernels``
    ModuleDict (the model's, or for LruNet its block's)."""
    with torch.device("meta"):
        model = create_model(name)
    assert model.info.classifier == "fc" and model.get_classifier() is model.fc
    owners = {n.rpartition(".")[0] for n, m in model.named_modules() if isinstance(m, dacnn.SharedKernel)}
    assert all(o.rpartition(".")[2] == "kernels" for o in owners), owners
    assert all(isinstance(model.get_submodule(o), torch.nn.ModuleDict) for o in owners)
    if "_shared" in name or model.info.shared_twin:
        assert owners  # a shared variant does own kernels


def test_create_model_records_resolved_kwargs() -> None:
    model = create_model("dacnn14", width=8, num_classes=None)
    assert model.info.model_kwargs == {"width": 8}
    assert not hasattr(model, "create_kwargs")


def _anchored(model: torch.nn.Module) -> list[tuple[str, AnchoredConv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AnchoredConv2d)]


SHARED = [n for n in MODELS if _anchored(small(n))] if MODELS else []


@pytest.mark.parametrize("name", SHARED)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_hook_on_every_use_fires(name: str, mode: str) -> None:
    model = small(name).train(mode == "train")
    x = _x(model)
    with torch.no_grad():
        plain = model(x) if mode == "eval" else None
    calls: dict[str, int] = {}
    for use_name, use in _anchored(model):
        use.register_forward_hook(lambda m, a, o, n=use_name: calls.__setitem__(n, calls.get(n, 0) + 1))
    with torch.no_grad():
        hooked = model(x)
    assert calls == {n: 1 for n, _ in _anchored(model)}
    if plain is not None:  # stepping aside for the hooks computes the same function
        torch.testing.assert_close(hooked, plain, rtol=1e-4, atol=1e-5)


def test_lrunet_fast_path_steps_aside_for_a_batchnorm_hook() -> None:
    model = small("lrunet_1x").eval()
    seen = []
    model.stage2.dw_bns[1].register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        model(_x(model, 1))
    assert seen == [1]


# one model per family, a shared variant where the family has one
FAMILY_EXAMPLES = sorted({model_info(n).family: n for n in sorted(MODELS, key=SHARED.__contains__)}.values())


@pytest.mark.parametrize("name", FAMILY_EXAMPLES)
def test_activation_maximisation_runs_on_every_family(name: str) -> None:
    model = small(name)
    flags = [p.requires_grad for p in model.parameters()]
    layers = [n for n, _ in visualised_layers(model)]
    pick = [layers[0], layers[len(layers) // 2], layers[-1]]
    chans = model.info.input_size[0]
    images, names = activation_maximisation(model, input_size(model), (0.5,) * chans, (0.25,) * chans,
                                            filters=2, steps=2, layers=pick)
    assert names == list(dict.fromkeys(pick)) and images.shape[:2] == (len(names), 2)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags  # caller's model intact
    assert all(p.grad is None for p in model.parameters())


# ---- pretrained names -------------------------------------------------------------------------------
RELEASED = ["lrunet_1x.cifar10_n1", "lrunet_1x.cifar10_n14", "lrunet_1x.fashion_mnist_n1",
            "lrunet_1x.fashion_mnist_n10", "lrunet_2x.cifar100_n1", "lrunet_2x.cifar100_n14"]


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


MANIFESTS = [d / "lrunet" / "MANIFEST.json" for d in weights_dirs()
             if (d / "lrunet" / "MANIFEST.json").is_file()]


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
    from dacnn.importing import import_lrunet

    model = create_model("lrunet_1x.fashion_mnist_n1", pretrained=True)
    reference, meta = import_lrunet(find_weights(dacnn.registry.pretrained_cfg("lrunet_1x.fashion_mnist_n1")))
    assert meta["pretrained"] == "lrunet_1x.fashion_mnist_n1" and not model.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_named_variants_reject_what_their_row_fixes() -> None:
    with pytest.raises(TypeError, match="dacnn14 fixes depth=14"):
        create_model("dacnn14", depth=8)
    with pytest.raises(TypeError, match="wrn40_4 fixes depth=40"):
        create_model("wrn40_4", depth=16)
    assert create_model("dacnn", depth=8, width=4).info.model_kwargs == {"depth": 8, "width": 4}
