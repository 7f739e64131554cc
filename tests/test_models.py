"""Every registered model, generically (timm's ``tests/test_models.py``): the registry API
(:mod:`dacnn.registry`) and timm's model contract (:mod:`dacnn.models.base`, :mod:`dacnn.features`).

Parametrised over ``list_models()``, so a model registered later is covered the day it lands. Each
check reads the model's own declarations (``feature_info``, ``pretrained_cfg``, ``group_matcher``) and
compares them with what its forward pass does. Models are built small (``_helpers.SMALL``); the
full-size builds are marked ``slow``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as tuc

import dacnn
from _helpers import SMALL, shared_model_names, small_input, small_model
from dacnn import (
    AnchoredConv2d,
    ModelInfo,
    SharedKernel,
    create_model,
    features,
    list_models,
    model_info,
    register_model,
)
from dacnn.data import DATASETS
from dacnn.errors import ConfigError
from dacnn.features import FeatureGetterNet, feature_take_indices

MODELS = list_models()
SHARED = shared_model_names()
TABLE6_NAMES = (  # one registered name per row of the DACNN paper's Table 6
    "vgg16_1fc", "resnet18", "resnet34", "dacnn14", "dacnn18", "dacnn34", "dacnn18_reg", "dacnn24_reg",
    "dacnn34_reg", "dacnn14_mix", "dacnn18_mix", "dacnn34_mix", "dacnn18_mix_reg", "dacnn34_mix_reg",
)
SIZES = ["small", pytest.param("full", marks=pytest.mark.slow)]
# timm's PretrainedCfg keys that timm's resolve_data_config and its tests read
TIMM_KEYS = ("architecture", "input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
             "num_classes", "pool_size", "first_conv", "classifier", "license", "paper_ids")


def _build(name: str, size: str, **kwargs) -> torch.nn.Module:
    """``name`` small (``_helpers.SMALL``) or at its registered size, initialised from seed 0."""
    if size == "small":
        return small_model(name, **kwargs)
    torch.manual_seed(0)
    return create_model(name, **kwargs)


def _input(model: torch.nn.Module, size: str, batch: int, seed: int = 1) -> torch.Tensor:
    if size == "small":
        return small_input(model, batch, seed)
    return torch.randn(batch, *model.info.input_size, generator=torch.Generator().manual_seed(seed))


def _x(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    return small_input(model, batch)


def _check_logits(out: torch.Tensor, batch: int, num_classes: int) -> None:
    assert out.shape == (batch, num_classes)
    assert torch.isfinite(out).all()


def _grads(model: torch.nn.Module, x: torch.Tensor, seed: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    out = model(x)
    out = out if out.ndim == 2 else out.flatten(1)
    F.cross_entropy(out, torch.arange(len(x)) % out.shape[1]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _anchored(model: torch.nn.Module) -> list[tuple[str, AnchoredConv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AnchoredConv2d)]


# ---------------------------------------------------------------- the registry API
def test_table6_names_registered() -> None:
    assert set(TABLE6_NAMES) <= set(MODELS)


def test_list_models_pattern_sorted() -> None:
    dacnns = list_models("dacnn*")
    assert dacnns == sorted(dacnns) and dacnns
    assert all(n.startswith("dacnn") for n in dacnns)
    assert set(dacnns) < set(list_models())
    assert list_models("no_such_model*") == []


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(KeyError, match="dacnn14"):
        create_model("dacnn_14")


def test_duplicate_name_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model(ModelInfo("dacnn14", "dacnn"))(lambda **kw: torch.nn.Identity())
    assert model_info("dacnn14").family == "dacnn"  # the original survives


def test_none_kwargs_dropped_and_info_resolved() -> None:
    model = create_model("dacnn14", num_classes=None, in_chans=None)
    assert model.info.num_classes == 100 and model.info.input_size == (3, 32, 32)
    model = create_model("dacnn14", num_classes=10, in_chans=1)
    assert model.info.num_classes == 10 and model.info.input_size == (1, 32, 32)
    _check_logits(model.eval()(torch.randn(2, 1, 32, 32)), 2, 10)


def test_create_model_records_resolved_kwargs() -> None:
    model = create_model("dacnn14", width=8, num_classes=None)
    assert model.info.model_kwargs == {"width": 8}
    assert not hasattr(model, "create_kwargs")


def test_named_variants_reject_what_their_row_fixes() -> None:
    with pytest.raises(TypeError, match="dacnn14 fixes depth=14"):
        create_model("dacnn14", depth=8)
    with pytest.raises(TypeError, match="wrn40_4 fixes depth=40"):
        create_model("wrn40_4", depth=16)
    assert create_model("dacnn", depth=8, width=4).info.model_kwargs == {"depth": 8, "width": 4}


@pytest.mark.parametrize("name", MODELS)
def test_model_info(name: str) -> None:
    info = model_info(name)
    assert info.name == name and info.family
    assert len(info.input_size) == 3 and info.num_classes > 1
    if info.shared_twin is not None:
        assert info.shared_twin in MODELS


@pytest.mark.parametrize("name", MODELS)
def test_every_name_is_a_register_model_function_in_its_family_file(name: str) -> None:
    """``grep "def <name>("`` finds every registered model: a ``@register_model`` function
    ``def <name>(pretrained: bool = False, **kwargs)`` in its family's file, over its config table."""
    module = importlib.import_module(f"dacnn.models.{model_info(name).family}")
    source = Path(module.__file__).read_text()
    signature = rf"@register_model\ndef {name}\(pretrained: bool = False, \*\*kwargs: Any\)"
    assert re.search(signature, source), name
    assert list(inspect.signature(getattr(module, name)).parameters) == ["pretrained", "kwargs"]
    assert name in module.default_cfgs and name in module.__all__


def test_every_family_has_a_small_config() -> None:
    assert {model_info(n).family for n in MODELS} <= set(SMALL)


# ---------------------------------------------------------------- forward, backward, timm's kwargs
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", SIZES)
def test_forward_backward_reaches_every_trainable_parameter(name: str, size: str) -> None:
    """Train-mode forward at batch 2 gives finite logits; every trainable parameter then receives a
    finite gradient."""
    model = _build(name, size, drop_rate=0.0, drop_path_rate=0.0).train()
    x = _input(model, size, 2)
    torch.manual_seed(3)
    out = model(x)
    _check_logits(out, 2, model.info.num_classes)
    F.cross_entropy(out, torch.arange(2) % out.shape[1]).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", SIZES)
def test_forward_batch1_and_eval_deterministic(name: str, size: str) -> None:
    model = _build(name, size).train()
    x1 = _input(model, size, 1, seed=0)
    try:
        out = model(x1)
    except ValueError as exc:  # train-mode BN on a 1x1 map cannot normalise one value per channel
        if "more than 1 value per channel" not in str(exc):
            raise
        out = model.eval()(x1)
    _check_logits(out, 1, model.info.num_classes)

    model.eval()
    x2 = _input(model, size, 2, seed=1)
    with torch.no_grad():
        first, second = model(x2), model(x2)
        alone = model(x2[:1])
    _check_logits(first, 2, model.info.num_classes)
    assert torch.equal(first, second)
    # eval: no batch coupling. Batch 1 and 2 may take other conv algorithms (oneDNN's choice depends on
    # the instruction set), so the two agree to rounding: a few eps per layer applied, relative to the
    # largest logit
    layers = sum(isinstance(m, torch.nn.Conv2d | torch.nn.Linear | AnchoredConv2d) for m in model.modules())
    tol = 16 * torch.finfo(first.dtype).eps * layers * first.abs().max().item()
    torch.testing.assert_close(alone, first[:1], rtol=0, atol=tol)


@pytest.mark.parametrize("name", MODELS)
def test_drop_rate_is_honoured(name: str) -> None:
    """timm's ``train.py`` always passes ``drop_rate``: 0 leaves a train-mode forward deterministic,
    a positive rate makes it random, and eval mode ignores it."""
    plain, dropped = small_model(name, drop_rate=0.0), small_model(name, drop_rate=0.5)
    assert plain.drop_rate == 0.0 and dropped.drop_rate == 0.5
    x = _x(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), dropped.eval()(x), rtol=0, atol=0)
    outs = []
    for model in (plain, plain, *[dropped] * 4):
        torch.manual_seed(len(outs))
        outs.append(model.train()(x).detach())
    assert torch.equal(outs[0], outs[1])
    assert not all(torch.equal(outs[2], o) for o in outs[3:])  # a few units: masks may repeat once


@pytest.mark.parametrize("name", MODELS)
def test_drop_path_rate_is_honoured_or_refused_with_a_sentence(name: str) -> None:
    try:
        model = small_model(name, drop_path_rate=0.2)
    except ConfigError as exc:
        assert "no stochastic depth" in str(exc) and "drop_path_rate must be 0" in str(exc)
        return
    blocks = [m for m in model.modules() if type(m).__name__ == "DropPath"]
    assert blocks and max(m.p for m in blocks) == pytest.approx(0.2)
    x = _x(model)
    outs = []
    for seed in range(4):
        torch.manual_seed(seed)
        outs.append(model.train()(x).detach())
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("name", MODELS)
def test_in_chans(name: str) -> None:
    model = small_model(name, in_chans=1).eval()
    assert model.info.input_size[0] == 1 and model.pretrained_cfg["input_size"][0] == 1
    assert len(model.pretrained_cfg["mean"]) == len(model.pretrained_cfg["std"]) == 1
    assert model.get_submodule(model.pretrained_cfg["first_conv"]).weight.shape[1] == 1
    with torch.no_grad():
        assert model(_x(model)).shape == (2, model.num_classes)


# ---------------------------------------------------------------- interface, classifier, ModelInfo
@pytest.mark.parametrize("name", MODELS)
def test_forward_features_head_and_model_info_agree(name: str) -> None:
    """timm's interface: ``forward_head(forward_features(x))`` is ``forward(x)``, ``model.info`` names
    the classifier and the first conv, ``reset_classifier`` changes the output."""
    model = small_model(name).eval()
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


@pytest.mark.parametrize("name", SHARED)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_hook_on_every_use_fires(name: str, mode: str) -> None:
    model = small_model(name).train(mode == "train")
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


# ---------------------------------------------------------------- pretrained_cfg (timm's keys)
@pytest.mark.parametrize("name", MODELS)
def test_pretrained_cfg_has_timms_keys_and_the_models_real_input(name: str) -> None:
    model = small_model(name)
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert set(TIMM_KEYS) <= set(cfg), set(TIMM_KEYS) - set(cfg)
    assert cfg["architecture"] == name and cfg["num_classes"] == model.num_classes
    assert tuple(cfg["input_size"]) == model.info.input_size and cfg["input_size"][1:] != (224, 224)
    assert len(cfg["mean"]) == len(cfg["std"]) == cfg["input_size"][0] and min(cfg["std"]) > 0
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] in ("bilinear", "bicubic", "nearest")
    assert all(re.fullmatch(r"arXiv:\d{4}\.\d{4,5}", p) for p in cfg["paper_ids"])
    # pool_size is what forward_features gives at the model's input size
    full = torch.zeros(1, *cfg["input_size"])
    with torch.no_grad():
        assert tuple(model.eval().forward_features(full).shape[2:]) == tuple(cfg["pool_size"])


def test_pretrained_cfg_statistics_follow_the_data() -> None:
    assert create_model("dacnn14", width=4).pretrained_cfg["mean"] == DATASETS["cifar100"].mean
    assert create_model("dacnn14", width=4, num_classes=10).pretrained_cfg["std"] == DATASETS["cifar10"].std
    lru = create_model("lrunet_1x.fashion_mnist_n10")  # the tag's config, no weights loaded
    assert lru.pretrained_cfg["input_size"] == (1, 28, 28) and lru.pretrained_cfg["mean"] == (0.0,)
    assert lru.pretrained_cfg["tag"] == "fashion_mnist_n10" and lru.pretrained_cfg["license"] == "mit"


# ---------------------------------------------------------------- head: reset_classifier, global_pool
@pytest.mark.parametrize("name", MODELS)
def test_reset_classifier_and_global_pool(name: str) -> None:
    """timm's ``test_model_default_cfgs``: ``pre_logits`` gives ``head_hidden_size`` features,
    ``reset_classifier(0)`` the same, ``reset_classifier(0, "")`` and ``num_classes=0,
    global_pool=""`` the unpooled maps of ``pool_size``."""
    model = small_model(name).eval()
    x = _x(model)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape[1] == model.num_features and pre.shape[1] == model.head_hidden_size
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.num_classes == 5
        model.reset_classifier(0)
        assert model.num_classes == 0 and model(x).shape == (2, model.head_hidden_size)
        model.reset_classifier(0, "")
        assert model(x).ndim == 4
        unpooled = small_model(name, num_classes=0, global_pool="").eval()
        maps = unpooled(x)
    assert maps.ndim == 4 and unpooled.global_pool == ""
    with pytest.raises(ConfigError, match="global_pool"):
        small_model(name, global_pool="no-such-pool")


@pytest.mark.parametrize("name", MODELS)
def test_every_pool_type_a_model_accepts_works(name: str) -> None:
    default = small_model(name)
    for pool in default.pool_types:
        if not pool:
            continue
        model = small_model(name, global_pool=pool).eval()
        with torch.no_grad():
            assert model(_x(model)).shape == (2, model.num_classes), pool
        assert model.head_hidden_size == default.head_hidden_size * (2 if pool == "catavgmax" else 1)


# ---------------------------------------------------------------- features
@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates_match_feature_info_and_forward_features(name: str) -> None:
    model = small_model(name).eval()
    x = _x(model)
    info = model.feature_info
    assert len(info) >= 3 and all({"num_chs", "reduction", "module"} <= set(level) for level in info)
    assert [lvl["reduction"] for lvl in info] == sorted(lvl["reduction"] for lvl in info)
    assert all(isinstance(model.get_submodule(lvl["module"]), torch.nn.Module) for lvl in info)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert torch.equal(model.forward_head(final), model(x))
        assert len(maps) == len(info)
        for level, fmap in zip(info, maps):
            assert fmap.shape[:2] == (2, level["num_chs"])
            bound = [math.ceil(d / level["reduction"]) + 1 for d in x.shape[2:]]
            assert all(s <= b for s, b in zip(fmap.shape[2:], bound))
        assert tuple(maps[-1].shape[2:]) == tuple(model.feature_size(x.shape[2:]))
        only = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        assert len(only) == 2 and torch.equal(only[0], maps[0])
        last2 = model.forward_intermediates(x, indices=2, stop_early=True)[1]
        assert [m.shape for m in last2] == [m.shape for m in maps[-2:]]


@pytest.mark.parametrize("name", MODELS)
def test_features_only_returns_one_map_per_level_and_trains(name: str) -> None:
    reference = small_model(name).eval()
    levels = len(reference.feature_info)
    out_indices = (1, levels - 2, levels - 1) if levels > 3 else tuple(range(levels))
    net = small_model(name, features_only=True, out_indices=out_indices)
    assert isinstance(net, FeatureGetterNet) and net.feature_info.out_indices == out_indices
    assert "num_classes" not in net.pretrained_cfg and net.pretrained_cfg["input_size"]
    x = _x(reference)
    with torch.no_grad():
        maps = net.eval()(x)
        expected = reference.forward_intermediates(x, indices=list(out_indices), intermediates_only=True)
    assert len(maps) == len(out_indices)
    assert [m.shape[1] for m in maps] == net.feature_info.channels()
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # pruned past the last level asked for: every parameter left gets a gradient (DDP needs that)
    net.train()
    sum(m.float().mean() for m in net(x)).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_prune_drops_a_kernel_no_kept_layer_applies() -> None:
    model = small_model("dacnn18_mix")
    assert set(model.kernels) == {"4", "8", "16", "32"}
    kept = model.prune_intermediate_layers(indices=[0, 1])  # the stem and stage 1 only
    assert kept == [0, 1] and set(model.kernels) == {"4"}
    with torch.no_grad():
        assert model.eval()(_x(model)).ndim == 4  # no head: the maps of stage 1


def test_feature_take_indices_is_timms_rule() -> None:
    assert feature_take_indices(5) == ([0, 1, 2, 3, 4], 4)
    assert feature_take_indices(5, 2) == ([3, 4], 4)
    assert feature_take_indices(5, [0, -1]) == ([0, 4], 4)
    with pytest.raises(ValueError, match="out of range for 5 levels"):
        feature_take_indices(5, [5])


# ---------------------------------------------------------------- group_matcher, no_weight_decay
def _ordinals(model: torch.nn.Module, coarse: bool) -> dict[str, tuple[float, ...]]:
    """timm's ``group_with_matcher`` (``timm/models/_manipulate.py``): the first matching entry gives a
    parameter its ordinal ``(group index, regex groups..., suffix...)``; no match: the head (inf)."""
    entries = []
    for g, spec in enumerate(model.group_matcher(coarse=coarse).values()):
        for regex, suffix in (spec if isinstance(spec, list) else [(spec, None)]):
            entries.append((re.compile(regex), (g,), suffix))
    result = {}
    for name, _ in model.named_parameters():
        matched = [(r.match(name), p, s) for r, p, s in entries if r.match(name)]
        assert len(matched) <= 1, f"{name} matches {len(matched)} group entries"
        if matched:
            found, prefix, suffix = matched[0]
            result[name] = tuple(float(v) for v in (*prefix, *found.groups(), *(suffix or ())))
        else:
            result[name] = (math.inf,)
    return result


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("coarse", [False, True])
def test_group_matcher_puts_every_parameter_in_one_group(name: str, coarse: bool) -> None:
    model = small_model(name)
    ordinals = _ordinals(model, coarse)
    first_conv = model.pretrained_cfg["first_conv"]
    assert ordinals[first_conv + ".weight"] == (0.0,), "the first conv is the stem group"
    head = {n for n, o in ordinals.items() if o == (math.inf,)}
    assert head and all(n.startswith(("fc.", "pre_logits.")) for n in head), head
    assert len(set(ordinals.values())) >= 3
    # a shared kernel is in the group of the block that applies it first
    uses: dict[int, str] = {}
    for use_name, use in model.named_modules():
        if isinstance(use, AnchoredConv2d):
            uses.setdefault(id(use.kernel), use_name)
    block_entries = model.group_matcher(coarse=coarse)["blocks"]
    block_regex = block_entries[0][0] if isinstance(block_entries, list) else block_entries
    for kernel_name, kernel in model.named_modules():
        if isinstance(kernel, SharedKernel):
            found = re.match(block_regex, uses[id(kernel)] + ".")
            assert found, uses[id(kernel)]
            want = (1.0, *(float(v) for v in found.groups()))
            assert ordinals[kernel_name + ".weight"] == want, kernel_name
    assert model.no_weight_decay() <= {n for n, _ in model.named_parameters()}


# ---------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_gives_the_same_step(name: str) -> None:
    """Same gradients, outputs and BatchNorm running statistics as without checkpointing (the
    recomputation does not update them twice)."""
    plain, ckpt = small_model(name).train(), small_model(name).train()
    ckpt.set_grad_checkpointing(True)
    assert ckpt.grad_checkpointing
    x = _x(plain)
    g_plain, g_ckpt = _grads(plain, x), _grads(ckpt, x)
    assert g_plain.keys() == g_ckpt.keys()
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-5, atol=1e-6, msg=n)
    for (n, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-6)


def test_grad_checkpointing_is_non_reentrant(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    original = tuc.checkpoint

    def spy(fn, *args, **kwargs):
        seen.append(kwargs.get("use_reentrant"))
        return original(fn, *args, **kwargs)

    monkeypatch.setattr(features, "checkpoint", spy)
    model = small_model("dacnn18")
    model.set_grad_checkpointing()
    model(_x(model)).sum().backward()
    assert seen and set(seen) == {False}


# ---------------------------------------------------------------- full size (slow)
@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_full_size_contract(name: str) -> None:
    model = create_model(name).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
    assert [m.shape[1] for m in maps] == [lvl["num_chs"] for lvl in model.feature_info]
    assert tuple(final.shape[2:]) == tuple(model.pretrained_cfg["pool_size"])
