"""airbench94 and its shared twin (dacnn.models.airbench) against airbench's own code and counts."""

from __future__ import annotations

import torch
from torch import nn

import dacnn
from dacnn.models.airbench import patch_whitening_weights


def _reference_count(width: int = 64, classes: int = 10) -> int:
    """airbench94's parameters by its layer list (``lib_airbench94.make_net94``): whitening conv with
    bias, per ConvGroup two bias-free 3x3 convs and two BatchNorms (weight and bias tensors), the
    bias-free linear layer."""
    w = (width, 4 * width, 4 * width)
    total = 24 * 3 * 2 * 2 + 24
    cin = 24
    for c in w:
        total += cin * c * 9 + c * c * 9 + 4 * c
        cin = c
    return total + w[2] * classes


def test_counts_match_airbench():
    assert _reference_count() == 1_972_792  # the figure airbench94's net prints
    assert dacnn.count_params(dacnn.create_model("airbench94")).unique == 1_972_792
    shared = dacnn.count_params(dacnn.create_model("airbench94_shared"))
    assert shared.unique == 1_972_792 - 2 * 256 * 256 * 9
    assert shared.per_use == 1_972_792
    assert [(t.shape, t.uses) for t in shared.shared] == [((256, 256, 3, 3), 3)]
    assert dacnn.count_params(dacnn.create_model("airbench94", width=32)).unique == _reference_count(32)


def test_shared_twin_computes_the_same_function_at_init():
    """Each 4w x 4w conv of airbench starts as the identity (dirac), so tying them changes nothing."""
    torch.manual_seed(0)
    free = dacnn.create_model("airbench94", width=8).eval()
    torch.manual_seed(0)
    tied = dacnn.create_model("airbench94_shared", width=8).eval()
    state = {k: v for k, v in free.state_dict().items()}
    own = tied.state_dict()
    for key in own:
        if key in state:
            own[key].copy_(state[key])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(free(x), tied(x), atol=1e-6)
    assert torch.equal(tied.kernels["conv"].weight, free.block3.conv1.weight)


def test_frozen_tensors_and_head():
    model = dacnn.create_model("airbench94", width=8)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "whiten.weight" in frozen and all(n.endswith("weight") for n in frozen)
    assert {n for n in frozen if "norm" in n} == {n for n, _ in model.named_parameters()
                                                   if "norm" in n and n.endswith("weight")}
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert torch.allclose(model.forward_head(feats), model.fc(model.forward_head(feats, pre_logits=True)) / 9)


def test_whitening_filters_whiten_the_patches():
    """The filters (and their negatives) map the patch covariance to ~the identity (eps aside)."""
    torch.manual_seed(0)
    mix = torch.randn(3, 3)
    images = torch.einsum("ij,njhw->nihw", mix, torch.randn(64, 3, 16, 16))
    w = patch_whitening_weights(images, 2, eps=0.0)
    assert w.shape == (24, 3, 2, 2)
    assert torch.allclose(w[:12], -w[12:])
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 12)
    out = patches @ w[:12].reshape(12, -1).T
    cov = out.T @ out / out.shape[0]
    assert torch.allclose(cov, torch.eye(12), atol=1e-3)


def test_init_whitening_sets_the_first_conv():
    model = dacnn.create_model("airbench94", width=8)
    images = torch.randn(32, 3, 32, 32)
    model.init_whitening(images)
    assert torch.allclose(model.whiten.weight, patch_whitening_weights(images, 2))
    assert isinstance(model.whiten, nn.Conv2d) and not model.whiten.weight.requires_grad
