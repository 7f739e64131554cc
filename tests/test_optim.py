"""Optimizer groups and learning-rate schedules (dacnn.train.optim, dacnn.train.builders.LRSchedule):
airbench's decoupled weight decay, its 64x lr on BatchNorm shifts and its triangle, by their formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dacnn
from dacnn.train.builders import LRSchedule, build_optimizer
from dacnn.train.config import config_from_dict
from dacnn.train.optim import freeze_norm_scales, is_norm_bias, param_groups


def _model():
    return dacnn.create_model("dacnn18_mix", width=4, num_classes=10)


def test_norm_biases_get_their_own_scaled_group():
    model = _model()
    groups = param_groups(model, 0.1, norm_bias_lr_scale=64.0)
    by_scale = {g["lr_scale"]: g for g in groups}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in by_scale[64.0]["params"]} == {
        n for n, _ in model.named_parameters() if is_norm_bias(model, n)}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # each tensor once


@pytest.mark.parametrize("scale", [1.0, 64.0])
def test_decoupled_decay_removes_the_same_fraction_from_every_group(scale):
    """With zero gradients and no momentum, one step multiplies every weight by ``1 - f * wd`` (f the
    schedule factor), whatever the group's learning rate."""
    model = _model()
    cfg = config_from_dict({"model": "dacnn18_mix", "optimizer": "sgd", "lr": 1.5, "momentum": 0.0,
                            "weight_decay": 0.002, "decoupled_weight_decay": True,
                            "norm_bias_lr_scale": scale, "lr_schedule": "triangle", "epochs": 2})
    for p in model.parameters():
        p.data.fill_(1.0)
    opt = build_optimizer(model, cfg)
    schedule = LRSchedule(cfg, steps_per_epoch=10)
    schedule.apply(opt, 0, 3)
    factor = schedule(0, 3) / cfg.lr
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in model.parameters():
        assert torch.allclose(p, torch.full_like(p, 1.0 - factor * 0.002), rtol=0, atol=1e-7)


def test_triangle_is_airbenchs():
    """airbench's ``triangle(steps, start=0.2, end=0.07, peak=0.23)``: np.interp over [0, peak, end]."""
    cfg = config_from_dict({"model": "x", "lr": 2.0, "lr_schedule": "triangle", "epochs": 10,
                            "lr_triangle": [0.2, 0.23, 0.07]})
    schedule = LRSchedule(cfg, steps_per_epoch=43)
    steps = 430
    expected = np.interp(np.arange(steps), [0, int(0.23 * steps), steps], [0.2, 1.0, 0.07]) * 2.0
    got = [schedule(i // 43, i % 43) for i in range(steps)]
    assert np.allclose(got, expected, atol=1e-12)


def test_freeze_norm_scales():
    model = _model()
    frozen = freeze_norm_scales(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert frozen == len(bns) and not any(m.weight.requires_grad for m in bns)
    assert all(m.bias.requires_grad for m in bns)
    assert freeze_norm_scales(model) == 0


def test_norms_after_shared_kernels_are_found_by_running_the_model_once():
    """airbench94_shared's three uses of its kernel are each followed (block 3's first through a max
    pool) by a BatchNorm; the free net has none; a share_kernels-tied net's tied convs are found too;
    the model's mode and running statistics are left as they were."""
    from dacnn.registry import create_model
    from dacnn.train.optim import norms_after_shared_kernels, thaw_norm_scales

    x = torch.zeros(1, 3, 32, 32)
    shared = create_model("airbench94_shared", width=8)
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    assert norms_after_shared_kernels(shared, x) == ["block2.norm2", "block3.norm1", "block3.norm2"]
    assert shared.training and all(torch.equal(before[k], v) for k, v in shared.state_dict().items())
    assert norms_after_shared_kernels(create_model("airbench94", width=8), x) == []
    tied = create_model("resnet18", width=32, num_classes=10, share_budget="ratio=0.44")
    found = norms_after_shared_kernels(tied, x)
    assert "stages.3.1.bn2" in found and "stages.0.0.bn1" in found
    assert not any(name.startswith("stem") for name in found)
    assert thaw_norm_scales(shared, ["block2.norm2"]) == 1 and shared.block2.norm2.weight.requires_grad
    assert thaw_norm_scales(shared, ["block2.norm2"]) == 0 and not shared.block1.norm1.weight.requires_grad
