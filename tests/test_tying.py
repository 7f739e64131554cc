"""``dacnn.share_kernels`` / ``dacnn.untie`` on our models and on models the library has never seen.

The torchvision-style ResNets below are written here (torchvision is not a dependency); ShaResNet's
ImageNet counts (SPEC.md 4) are the check: ResNet-34 21,797,672 -> 13,613,864 and ResNet-50
25,557,032 -> 20,469,800.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _helpers import first_kernel_copied
from dacnn import count_params, create_model, share_kernels, untie
from dacnn.errors import ConfigError
from dacnn.shared_kernel import AnchoredConv2d, SharedKernel, anchored_uses


# ---- a torchvision-style ResNet (v1.5: stride on the bottleneck's 3x3) --------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, block: type, layers: list[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            out = planes * block.expansion
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride, bias=False),
                                       nn.BatchNorm2d(out))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _assert_report_adds_up(model: nn.Module, report: object) -> None:
    count = count_params(model)
    assert report.params_before - sum(g.saved for g in report.groups) == report.params_after == count.unique
    assert count.per_use == report.params_before


def _free_output_equal_after_untie(model: nn.Module, x: torch.Tensor) -> None:
    """share -> copy each use's original weights back is not possible, but untie must be exact."""
    model.eval()
    with torch.no_grad():
        before = model(x)
        untie(model)
        torch.testing.assert_close(model(x), before)


# ---- unseen models --------------------------------------------------------------------------------
def test_resnet50_sharesnet_imagenet_rule() -> None:
    """ShaResNet on ImageNet bottlenecks: the 3x3 conv is shared wherever its stride is 1."""
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [3, 4, 6, 3])
    original = copy.deepcopy(model)
    assert _count(model) == 25_557_032
    report = share_kernels(model, scope="stage", stride_policy="unstrided", include="*.conv2")
    assert report.params_before == 25_557_032 and report.params_after == _count(model) == 20_469_800
    _assert_report_adds_up(model, report)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), first_kernel_copied(original, report)(x),
                                   rtol=1e-5, atol=1e-6)
    model.train()
    assert [len(g.uses) for g in report.groups] == [3, 3, 5, 2]
    assert report.groups[1].uses == ["layer2.1.conv2", "layer2.2.conv2", "layer2.3.conv2"]
    assert isinstance(model.layer2[0].conv2, nn.Conv2d)  # strided: stays free
    # each kernel is registered once, under its group's first use; no module gains a child
    assert [g.kernel for g in report.groups] == [f"layer{i}.{int(i > 1)}.conv2.kernel" for i in (1, 2, 3, 4)]
    assert not hasattr(model, "shared_kernels")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 53  # every BN still there, free
    assert sum(1 for _ in model.state_dict()) == len(dict(model.named_parameters())) + 3 * 53
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.layer3[1].conv2.kernel.weight.grad is not None


def test_resnet34_sharesnet_basic_block_rule() -> None:
    model = ResNet(BasicBlock, [3, 4, 6, 3])
    assert _count(model) == 21_797_672
    report = share_kernels(model, include="*.conv2")
    assert report.params_after == 13_613_864
    assert [len(g.uses) for g in report.groups] == [3, 4, 6, 3]


def test_resnet34_all_isomorphic_convs_per_stage() -> None:
    """Without a filter every unstrided C x C 3x3 conv of a stage is tied (conv1 of blocks 2..n too)."""
    model = ResNet(BasicBlock, [3, 4, 6, 3])
    report = share_kernels(model, scope="stage")
    assert [len(g.uses) for g in report.groups] == [6, 7, 11, 5]
    expected = 21_797_672 - sum((n - 1) * 9 * c * c for n, c in zip((6, 7, 11, 5), (64, 128, 256, 512)))
    assert report.params_after == expected == count_params(model).unique
    assert count_params(model).per_use == 21_797_672


def test_user_sequential_shared_and_untied() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    reference = copy.deepcopy(model)
    report = share_kernels(model)  # two resolutions -> two kernels
    assert type(model) is nn.Sequential and len(model) == len(reference)  # nothing attached to the root
    assert [g.uses for g in report.groups] == [["3", "6"], ["10", "13"]]
    assert len(model) == len(reference) and isinstance(model[3], AnchoredConv2d)
    assert report.params_after == report.params_before - 2 * (16 * 16 * 9 + 16)
    _assert_report_adds_up(model, report)
    with torch.no_grad():
        x = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(model.eval()(x), first_kernel_copied(reference, report)(x),
                                   rtol=1e-5, atol=1e-6)
    # initialised from the group's first conv: the first use of each group computes what it did
    torch.testing.assert_close(model[3].kernel.weight, reference[3].weight)
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 10)
    global_model = copy.deepcopy(reference)
    assert len(share_kernels(global_model, scope="global").groups[0].uses) == 4
    _free_output_equal_after_untie(model, x)
    assert type(model) is nn.Sequential and [type(m) for m in model] == [type(m) for m in reference]
    assert _count(model) == _count(reference)


def test_se_resnet_becomes_the_shared_one() -> None:
    """share_kernels on the free SE-ResNet gives SPEC's shared count (the paper's per-stage rule)."""
    for n, expected in ((2, 1_223_002), (4, 1_248_090)):
        model = create_model(f"se_resnet_d_{n}")
        report = share_kernels(model, scope="stage")
        assert report.params_after == expected == count_params(create_model(f"se_resnet_d_{n}_shared")).unique
        assert [len(g.uses) for g in report.groups] == [2 * n - 1] * 3
        assert report.groups[0].uses[:3] == ["stages.0.0.conv2", "stages.0.1.conv1", "stages.0.1.conv2"]
        assert report.groups[0].kernel == "stages.0.0.conv2.kernel"


@pytest.mark.parametrize("name,rule", [
    ("sharesnet164", dict(include="*.conv2", exclude="stages.*.0.*")),
    ("wrn40_4", dict(include="*.conv2", exclude="stages.*.0.*")),
])
def test_reproduces_sharesnet_cifar_rule(name: str, rule: dict) -> None:
    model = create_model(name)
    report = share_kernels(model, scope="global", **rule)  # the stage widths differ: global suffices
    assert report.params_after == count_params(create_model(name + "_shared")).unique


def test_scopes_and_stride_policies() -> None:
    # 3 -> 8 stem, then 8x8 3x3 convs: one stride-2, the others stride 1 at two resolutions
    def net() -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                             nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                             nn.Conv2d(8, 8, 3, padding=1, dilation=1))
    uses = lambda r: [g.uses for g in r.groups]  # noqa: E731
    assert uses(share_kernels(net(), scope="global", stride_policy="any")) == [["1", "2", "3", "4"]]
    assert uses(share_kernels(net(), scope="global", stride_policy="same")) == [["1", "3", "4"]]
    assert uses(share_kernels(net(), scope="global", stride_policy="unstrided")) == [["1", "3", "4"]]
    # "stage" = same output resolution: the strided conv joins the 8x8 convs after it
    assert uses(share_kernels(net(), scope="stage", stride_policy="any")) == [["2", "3", "4"]]
    assert uses(share_kernels(net(), scope="global", exclude=["4", "3"])) == []
    pick = lambda name, m: name in {"1", "4"}  # noqa: E731
    assert uses(share_kernels(net(), scope="global", include=pick)) == [["1", "4"]]
    model = net()
    out = model(torch.randn(1, 3, 8, 8))
    share_kernels(model, scope="global", stride_policy="any")
    assert model[2].stride == (2, 2) and model(torch.randn(1, 3, 8, 8)).shape == out.shape


def test_container_scope_and_non_isomorphic_convs() -> None:
    model = ResNet(BasicBlock, [2, 2, 2, 2])
    report = share_kernels(model, scope="container", include="*.conv2")
    assert [len(g.uses) for g in report.groups] == [2, 2, 2, 2]
    # bias presence, groups and kernel size must all match
    mixed = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, bias=False),
                          nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 1))
    assert share_kernels(mixed, scope="global").groups == []


def test_conv_registered_under_two_parents_is_one_candidate() -> None:
    shared_conv = nn.Conv2d(4, 4, 3, padding=1)
    a, b = nn.Sequential(shared_conv, nn.ReLU()), nn.Sequential(shared_conv, nn.ReLU())
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), a, b, nn.Conv2d(4, 4, 3, padding=1))
    report = share_kernels(model, scope="global")
    assert report.groups[0].uses == ["1.0", "2.0", "3"]
    assert model[1][0] is model[2][0]  # still one module applied twice
    assert anchored_uses(model)[id(model[1][0].kernel)] == 2


def test_untie_restores_free_layers_and_removes_kernels() -> None:
    torch.manual_seed(0)
    model = create_model("se_resnet_d_2_shared").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    names = untie(model)
    assert len(names) == 3 * 3
    assert not any(isinstance(m, (SharedKernel, AnchoredConv2d)) for m in model.modules())
    assert _count(model) == 2_771_290
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    assert untie(model) == []


def test_bad_arguments_and_failing_probe() -> None:
    with pytest.raises(ConfigError, match="scope"):
        share_kernels(nn.Sequential(nn.Conv2d(1, 1, 1)), scope="block")
    with pytest.raises(ConfigError, match="stride_policy"):
        share_kernels(nn.Sequential(nn.Conv2d(1, 1, 1)), stride_policy="strided")
    flat = nn.Sequential(nn.Flatten(), nn.Unflatten(1, (3, 4, 4)), nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1))
    with pytest.raises(ConfigError, match="example_input"):
        share_kernels(flat)  # the default 32x32 probe does not fit
    report = share_kernels(flat, example_input=torch.randn(1, 48))
    assert len(report.groups) == 1
