"""The ``../shared/reference/PITFALLS.md`` items that apply to the plug-in, on a ``share_kernels`` model.

A small ResNet-style net (3x3 convs, one BatchNorm per use) is tied by :func:`dacnn.share_kernels`
and then put through what bites tied weights elsewhere: counting (B.1), state_dict aliases and
``assign=True`` (B.2), safetensors (B.3), EMA (B.4), conv-BN folding (B.5), ``to_empty``/deepcopy
(B.8), optimizer groups (B.9), ONNX initializers (B.10), FLOPs per use (B.12), BatchNorm per use (B.13).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.fx.experimental.optimization import fuse

from dacnn import AnchoredConv2d, SharedKernel, count_flops, count_params, share_kernels, untie
from dacnn.train.ema import ModelEMA
from dacnn.train.optim import param_groups


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.layer2 = nn.Sequential(Block(16), Block(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.down(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _pair() -> tuple[nn.Module, nn.Module]:
    """(free original with non-trivial BN statistics, its share_kernels copy), both in eval mode."""
    torch.manual_seed(0)
    original = Net()
    gen = torch.Generator().manual_seed(0)
    for m in original.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
    shared = copy.deepcopy(original)
    report = share_kernels(shared, example_input=X)
    assert [len(g.uses) for g in report.groups] == [4, 4]
    return original.eval(), shared.eval()


def _tied(model: nn.Module) -> None:
    kernels = [m for m in model.modules() if isinstance(m, SharedKernel)]
    uses = [m for m in model.modules() if isinstance(m, AnchoredConv2d)]
    assert len(kernels) == 2 and len(uses) == 8 and all(any(u.kernel is k for k in kernels) for u in uses)
    ids = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    assert len(ids) == len(set(ids))


def test_b1_counts_and_b13_one_batchnorm_per_use() -> None:
    original, shared = _pair()
    counts = count_params(shared)
    assert counts.per_use == count_params(original).unique == sum(p.numel() for p in original.parameters())
    assert counts.unique == counts.per_use - 3 * 8 * 8 * 9 - 3 * 16 * 16 * 9
    assert sorted((s.shape, s.uses) for s in counts.shared) == [((8, 8, 3, 3), 4), ((16, 16, 3, 3), 4)]
    bns = [n for n, m in shared.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns == [n for n, m in original.named_modules() if isinstance(m, nn.BatchNorm2d)] and len(bns) == 8


def test_b2_state_dict_has_one_key_per_tensor_and_assign_keeps_tying() -> None:
    _, shared = _pair()
    state = shared.state_dict()
    assert len([k for k in state if k.endswith("kernel.weight")]) == 2
    tensors = {id(v) for v in state.values()}
    assert len(tensors) == len(state)  # no aliased keys whose values could disagree
    _, fresh = _pair()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    _tied(fresh)
    assert count_params(fresh).unique == count_params(shared).unique
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), shared(X), rtol=0, atol=0)


def test_b3_safetensors_save_file_accepts_the_state_dict(tmp_path) -> None:  # noqa: ANN001
    _, shared = _pair()
    save_file(shared.state_dict(), str(tmp_path / "m.safetensors"))  # raises on shared memory
    _, fresh = _pair()
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    _tied(fresh)


def test_b4_ema_moves_a_shared_kernel_once_per_step() -> None:
    _, shared = _pair()
    ema = ModelEMA(shared, decay=0.9)
    kernel = shared.layer1[0].conv1.kernel
    start = ema.module.layer1[0].conv1.kernel.weight.clone()
    with torch.no_grad():
        kernel.weight.add_(1.0)
    ema.update(shared)
    moved = (ema.module.layer1[0].conv1.kernel.weight - start).mean().item()
    assert moved == pytest.approx(0.1, abs=1e-6)  # not 1 - 0.9**4


def test_b5_conv_bn_folding_leaves_uses_alone_and_folds_after_untie() -> None:
    _, shared = _pair()
    with torch.no_grad():
        expected = shared(X)
        torch.testing.assert_close(fuse(shared)(X), expected, rtol=1e-4, atol=1e-5)
        untied = copy.deepcopy(shared)
        untie(untied)
        folded = fuse(untied)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(X), expected, rtol=1e-4, atol=1e-5)


def test_b8_to_empty_and_deepcopy_keep_tying() -> None:
    _, shared = _pair()
    _tied(copy.deepcopy(shared))
    meta = copy.deepcopy(shared).to("meta")
    meta.to_empty(device="cpu")
    _tied(meta)
    assert count_params(meta).unique == count_params(shared).unique


def test_b9_optimizer_groups_hold_each_tensor_once() -> None:
    _, shared = _pair()
    groups = param_groups(shared, weight_decay=0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(shared.parameters()))
    torch.optim.AdamW(groups, lr=1e-3)  # raises on duplicates


def test_b10_onnx_stores_each_kernel_once(tmp_path) -> None:  # noqa: ANN001
    onnx = pytest.importorskip("onnx")
    _, shared = _pair()
    path = tmp_path / "m.onnx"
    torch.onnx.export(shared, (X,), str(path), dynamo=False, input_names=["x"], do_constant_folding=False)
    inits = onnx.load(str(path)).graph.initializer
    assert len([i for i in inits if tuple(i.dims) == (8, 8, 3, 3)]) == 1
    assert len([i for i in inits if tuple(i.dims) == (16, 16, 3, 3)]) == 1


def test_b12_flops_count_every_use() -> None:
    original, shared = _pair()
    assert count_flops(shared, (3, 16, 16)) == count_flops(original, (3, 16, 16)) > 0
