"""SE-ResNet for CIFAR with per-stage kernel sharing (arXiv 2210.14151; SPEC.md 1.3)."""

from __future__ import annotations

import copy

import pytest
import torch

from dacnn import count_params, create_model, list_models, untie
from dacnn.errors import ConfigError
from dacnn.models.se_resnet import SEResNet, SqueezeExcitation
from dacnn.shared_kernel import AnchoredConv2d

# SPEC.md 1.3, all [verified]: (n, shared) -> (CIFAR-10, CIFAR-100)
SPEC = {
    (2, False): (2_771_290, 2_794_420), (2, True): (1_223_002, 1_246_132),
    (3, False): (4_332_122, 4_355_252), (3, True): (1_235_546, 1_258_676),
    (4, False): (5_892_954, 5_916_084), (4, True): (1_248_090, 1_271_220),
    (6, True): (1_273_178, 1_296_308), (8, True): (1_298_266, 1_321_396), (10, True): (1_323_354, 1_346_484),
}


def formula(n: int, share: tuple[bool, bool, bool], classes: int) -> int:
    """SPEC.md 1.3 closed forms (stem, stages, head)."""
    total = 464 + 256 * classes + classes
    for (c, cin), shared in zip(((64, 16), (128, 64), (256, 128)), share):
        if shared:
            total += 10 * cin * c + 9 * c * c + 2 * c + n * (4 * c + c * c // 8)
        else:
            total += 10 * cin * c + 9 * c * c + 6 * c + c * c // 8
            total += (n - 1) * (18 * c * c + 4 * c + c * c // 8)
    return total


@pytest.mark.parametrize("n,shared", sorted(SPEC))
def test_counts_equal_spec(n: int, shared: bool) -> None:
    name = f"se_resnet_d_{n}" + ("_shared" if shared else "")
    for classes, expected in zip((10, 100), SPEC[(n, shared)]):
        assert count_params(create_model(name, num_classes=classes)).unique == expected


def test_registered_names_and_defaults() -> None:
    names = set(list_models("se_resnet_d_*"))
    assert names == {f"se_resnet_d_{n}{s}" for n in (2, 3, 4, 6, 8, 10) for s in ("", "_shared")}
    model = create_model("se_resnet_d_4_shared")
    assert model.info.num_classes == 10 and model.info.shared_twin == "se_resnet_d_4"


@pytest.mark.parametrize("n", [2, 3, 4, 6, 8, 10])
def test_shared_per_use_equals_unshared_and_naive_count(n: int) -> None:
    shared, free = SEResNet(n, share_stages=True), SEResNet(n, share_stages=False)
    counts = count_params(shared)
    assert counts.per_use == count_params(free).unique == formula(n, (False,) * 3, 10)
    assert sum(p.numel() for _, p in shared.named_parameters(remove_duplicate=False)) == counts.unique
    assert sorted(s.uses for s in counts.shared) == [2 * n - 1] * 3
    if n == 10:
        assert counts.per_use == 15_257_946  # SPEC: naive total of d_10 shared


@pytest.mark.parametrize("share", [(True, False, False), (False, True, True), (False, False, True)])
def test_per_stage_switch(share: tuple[bool, bool, bool]) -> None:
    model = SEResNet(3, share_stages=share)
    assert count_params(model).unique == formula(3, share, 10)
    for stage, shared in zip(model.stages, share):
        first, rest = stage[0], list(stage)[1:]
        assert not isinstance(first.conv1, AnchoredConv2d)  # Cin != C, maybe strided: always free
        assert isinstance(first.conv2, AnchoredConv2d) == shared
        assert all(isinstance(b.conv1, AnchoredConv2d) == shared for b in rest)


def test_block_structure_and_forward() -> None:
    torch.manual_seed(0)
    model = SEResNet(2, share_stages=True).eval()
    assert [type(b.shortcut).__name__ for b in model.stages[0]] == ["Sequential", "Identity"]
    assert [b.conv1.stride for b in (s[0] for s in model.stages)] == [(1, 1), (2, 2), (2, 2)]
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    se = SqueezeExcitation(32)
    y = torch.randn(2, 32, 4, 4)
    gate = torch.sigmoid(se.fc[2](torch.relu(se.fc[0](y.mean((2, 3))))))
    torch.testing.assert_close(se(y), y * gate[:, :, None, None])


def test_shared_gradient_sums_over_uses() -> None:
    """The shared kernel's gradient is the sum of the gradients its uses get as free convs."""
    torch.manual_seed(0)
    model = SEResNet(2, share_stages=(True, False, False))
    free = copy.deepcopy(model)
    names = untie(free)  # same function, one free copy of the kernel per use
    assert len(names) == 3 and not count_params(free).shared
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    free(x).sum().backward()
    uses = dict(free.named_modules())
    summed = sum(uses[n].weight.grad for n in names)
    torch.testing.assert_close(model.kernels["0"].weight.grad, summed, rtol=1e-4, atol=1e-6)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="share_stages"):
        SEResNet(2, share_stages=(True, False))
    with pytest.raises(ConfigError, match="blocks"):
        SEResNet(0)


def test_width_scales_the_three_stages_and_64_is_the_reference():
    ref, same = create_model("se_resnet_d_2_shared"), create_model("se_resnet_d_2_shared", width=64)
    shapes = [[(k, v.shape) for k, v in m.state_dict().items()] for m in (ref, same)]
    assert shapes[0] == shapes[1]
    small = create_model("se_resnet_d_2_shared", width=16)
    kernels = [tuple(k.weight.shape) for k in small.kernels.values()]
    assert kernels == [(16, 16, 3, 3), (32, 32, 3, 3), (64, 64, 3, 3)]
    assert small.num_features == 64 and small.stem[0].out_channels == 16  # the reference's 16-channel stem
