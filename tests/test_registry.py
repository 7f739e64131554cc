"""The registry API and tests generic over every registered model (timm's test_models.py habit).

Parametrised over ``list_models()``, so a model registered later is covered the day it lands:
forward at batch 1 and 2, backward where every parameter gets a gradient, output shape, no NaN,
eval mode deterministic.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dacnn import ModelInfo, create_model, list_models, model_info, register_model

MODELS = list_models()
ISSUE_NAMES = (  # issue 2: one registered name per row of the DACNN paper's Table 6
    "vgg16_1fc", "resnet18", "resnet34", "dacnn14", "dacnn18", "dacnn34", "dacnn18_reg", "dacnn24_reg",
    "dacnn34_reg", "dacnn14_mix", "dacnn18_mix", "dacnn34_mix", "dacnn18_mix_reg", "dacnn34_mix_reg",
)



def _input(model: torch.nn.Module, batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *model.info.input_size, generator=gen)


def _check_logits(out: torch.Tensor, batch: int, num_classes: int) -> None:
    assert out.shape == (batch, num_classes)
    assert torch.isfinite(out).all()


# ---- registry API -------------------------------------------------------------------------------
def test_issue_names_registered() -> None:
    assert set(ISSUE_NAMES) <= set(MODELS)


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


@pytest.mark.parametrize("name", MODELS)
def test_model_info(name: str) -> None:
    info = model_info(name)
    assert info.name == name and info.family
    assert len(info.input_size) == 3 and info.num_classes > 1
    if info.shared_twin is not None:
        assert info.shared_twin in MODELS


# ---- generic over the registry ------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_batch2(name: str) -> None:
    """Train-mode forward at batch 2, then every trainable parameter receives a gradient."""
    torch.manual_seed(0)
    model = create_model(name).train()
    out = model(_input(model, 2))
    _check_logits(out, 2, model.info.num_classes)
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", MODELS)
def test_forward_batch1_and_eval_deterministic(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).train()
    x1 = _input(model, 1)
    try:
        out = model(x1)
    except ValueError as exc:  # train-mode BN on a 1x1 map cannot normalise one value per channel
        if "more than 1 value per channel" not in str(exc):
            raise
        out = model.eval()(x1)
    _check_logits(out, 1, model.info.num_classes)

    model.eval()
    x2 = _input(model, 2, seed=1)
    with torch.no_grad():
        first, second = model(x2), model(x2)
        alone = model(x2[:1])
    _check_logits(first, 2, model.info.num_classes)
    assert torch.equal(first, second)
    torch.testing.assert_close(alone, first[:1], rtol=1e-4, atol=1e-5)  # eval: no batch coupling


# ---- timm's registration idiom ------------------------------------------------------------------
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
