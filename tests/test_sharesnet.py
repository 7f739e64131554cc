"""ShaResNet for CIFAR (arXiv 1702.08782; SPEC.md section 4): pre-act ResNet-164, WRN-40-4, WRN-28-10."""

from __future__ import annotations

import pytest
import torch

from dacnn import count_params, create_model, model_info
from dacnn.errors import ConfigError
from dacnn.models.sharesnet import PreActResNet, WideResNet
from dacnn.shared_kernel import AnchoredConv2d, anchored_uses

SPEC = {  # ShaResNet README, reproduced in SPEC.md 4: name -> (free, shared)
    "sharesnet164": (1_703_258, 929_114),
    "wrn40_4": (8_949_210, 5_852_634),
    "wrn28_10": (36_536_884, 26_860_084),
}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_counts_equal_spec(name: str) -> None:
    free, shared = create_model(name), create_model(name + "_shared")
    assert count_params(free).unique == SPEC[name][0]
    counts = count_params(shared)
    assert counts.unique == SPEC[name][1]
    assert counts.per_use == SPEC[name][0]
    assert model_info(name + "_shared").shared_twin == name
    assert model_info("wrn28_10").num_classes == 100 and model_info("wrn40_4").num_classes == 10


def test_sharing_rule_first_unit_of_each_stage_free() -> None:
    for model, n in ((PreActResNet(29, shared=True), 3), (WideResNet(16, 2, shared=True), 2)):
        for s, stage in enumerate(model.stages):
            units = list(stage)
            assert not isinstance(units[0].conv2, AnchoredConv2d)
            assert all(isinstance(u.conv2, AnchoredConv2d) and u.conv2.kernel is model.kernels[str(s)]
                       for u in units[1:])
            assert all(not isinstance(u.conv1, AnchoredConv2d) for u in units)
        assert [anchored_uses(model)[id(k)] for k in model.kernels.values()] == [n - 1] * 3


@pytest.mark.parametrize("build", [
    lambda s: PreActResNet(20, shared=s),
    lambda s: WideResNet(10, 2, shared=s),
    lambda s: WideResNet(16, 1, shared=s),
])
def test_small_variants_train(build) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    for shared in (False, True):
        model = build(shared)
        out = model(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 10)
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters())  # no dead (unused) tensors


def test_preactivation_unit() -> None:
    """Identity units add the branch to the raw input; projecting units share the pre-activation."""
    torch.manual_seed(0)
    model = WideResNet(10, 2).eval()
    first, = list(model.stages[1])
    x = torch.randn(2, 32, 8, 8)
    a = first.preact(x)
    torch.testing.assert_close(first(x), first.shortcut(a) + first.conv2(first.act1(first.conv1(a))))
    unit = list(PreActResNet(20).eval().stages[0])[1]
    y = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(unit(y), y + unit.branch(unit.preact(y)))


def test_bad_depths() -> None:
    with pytest.raises(ConfigError, match="9n\\+2"):
        PreActResNet(165)
    with pytest.raises(ConfigError, match="6n\\+4"):
        WideResNet(27, 10)
