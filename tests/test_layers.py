"""``dacnn.models.layers``: the one residual block and the one BatchNorm-folding rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dacnn import SharedKernel
from dacnn.models.layers import BasicBlock, Regulator, conv_use, fold_bn


def _bn(channels: int, affine: bool) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(1)
    bn = nn.BatchNorm2d(channels, affine=affine).eval()
    bn.running_mean.copy_(torch.randn(channels, generator=g))
    bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.randn(channels, generator=g))
            bn.bias.copy_(torch.randn(channels, generator=g))
    return bn


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_bn_is_the_batchnorm_of_the_conv_in_eval_mode(affine: bool, with_bias: bool) -> None:
    """Ioffe & Szegedy's Algorithm 2: ``BN(conv(x, W, b)) = conv(x, W a, (b - mean) a + beta)``."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64), torch.randn(5, 4, 3, 3, generator=g,
                                                                               dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if with_bias else None
    bn = _bn(5, affine).double()
    weight, bias = fold_bn(w, b, bn)
    torch.testing.assert_close(F.conv2d(x, weight, bias, padding=1), bn(F.conv2d(x, w, b, padding=1)))


def test_fold_bn_is_differentiable_in_the_weight() -> None:
    w = torch.randn(3, 2, 1, 1, requires_grad=True)
    fold_bn(w, None, _bn(3, True))[0].sum().backward()
    assert w.grad is not None


def test_basic_block_projects_the_shortcut_only_where_the_shape_changes() -> None:
    assert isinstance(BasicBlock(8, 8).shortcut, nn.Identity)
    assert isinstance(BasicBlock(8, 16, 2).shortcut, nn.Sequential)
    assert BasicBlock(8, 8, 2)(torch.randn(1, 8, 8, 8)).shape == (1, 8, 4, 4)


def test_basic_block_takes_shared_convs_an_injected_norm_and_a_regulator() -> None:
    kernel = SharedKernel(8, 8, 3)
    block = BasicBlock(8, 8, conv1=conv_use(kernel, 8, 8), conv2=conv_use(kernel, 8, 8),
                       norm_layer=nn.Identity, regulator=True)
    assert isinstance(block.bn1, nn.Identity) and isinstance(block.regulator, Regulator)
    assert block.conv1.kernel is block.conv2.kernel is kernel
    x = torch.randn(2, 8, 5, 5)
    want = block.regulator(F.relu(F.conv2d(F.relu(F.conv2d(x, kernel.weight, padding=1)), kernel.weight,
                                             padding=1) + x))
    torch.testing.assert_close(block(x), want, rtol=0, atol=0)
