"""timm's model contract (:mod:`dacnn.models.base`, :mod:`dacnn.features`), on every registered model.

Modelled on timm's ``tests/test_models.py`` (``test_model_forward``, ``test_model_backward``,
``test_model_default_cfgs``, ``test_model_forward_features``, ``test_model_forward_intermediates``),
without timm: each check reads the model's own declarations (``feature_info``, ``pretrained_cfg``,
``group_matcher``) and compares them with what its forward pass does. Models are built small
(``_helpers.SMALL``); full-size builds are marked ``slow``.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from _helpers import SMALL, small_input, small_model
from dacnn import AnchoredConv2d, SharedKernel, create_model, list_models, model_info
from dacnn.errors import ConfigError
from dacnn.features import FeatureGetterNet, feature_take_indices

MODELS = list_models()
# timm's PretrainedCfg keys that timm's resolve_data_config and its tests read
TIMM_KEYS = ("architecture", "input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
             "num_classes", "pool_size", "first_conv", "classifier", "license", "paper_ids")


def _x(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    return small_input(model, batch)


def _grads(model: torch.nn.Module, x: torch.Tensor, seed: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    out = model(x)
    out = out if out.ndim == 2 else out.flatten(1)
    F.cross_entropy(out, torch.arange(len(x)) % out.shape[1]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_every_family_has_a_small_config() -> None:
    assert {model_info(n).family for n in MODELS} <= set(SMALL)


# ---------------------------------------------------------------- forward, backward, timm's kwargs
@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_trainable_parameter(name: str) -> None:
    model = small_model(name, drop_rate=0.0, drop_path_rate=0.0).train()
    grads = _grads(model, _x(model))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in grads]
    assert not missing, missing[:5]
    assert all(torch.isfinite(g).all() for g in grads.values())


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
    from dacnn.data import DATASETS

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
    import torch.utils.checkpoint as tuc

    from dacnn import features

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
