"""BatchNorm folding (:mod:`dacnn.train.inference`) changes no arithmetic beyond rounding.

Ground truth: the unfolded eval-mode network (in float64 folding is exact up to rounding).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dacnn import count_params, create_model
from dacnn.data import DeviceLoader
from dacnn.data.synthetic import random_split
from dacnn.train.engine import evaluate
from dacnn.train.inference import fold_batchnorm

FOLD_MODELS = [("dacnn14", {"width": 8}), ("dacnn18_mix_reg", {}), ("resnet18", {"width": 4}),
               ("se_resnet_d_2_shared", {}), ("vgg16_1fc", {}), ("lrunet_1x", {"layer_reuse": 2})]


def _randomise_batchnorm(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0),
                              (m.weight.data, 0.5, 1.5), (m.bias.data, -0.2, 0.2)):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) * (hi - lo) + lo)


@pytest.mark.parametrize(("name", "kwargs"), FOLD_MODELS, ids=[m for m, _ in FOLD_MODELS])
def test_folded_copy_computes_the_eval_function_and_leaves_the_model_alone(name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kwargs).double()
    _randomise_batchnorm(model)
    model.eval()
    before = count_params(model)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        folded = fold_batchnorm(model)
        got = folded(x)
    assert (got - expected).abs().max() <= 1e-10 * expected.abs().max()
    assert count_params(model) == before  # still tied, nothing moved into the original
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert bns < sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_dacnn14_folds_every_batchnorm():
    folded = fold_batchnorm(create_model("dacnn14", width=8, num_classes=10))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_a_preactivation_block_outside_the_models_is_left_alone():
    class PreActBlock(nn.Module):  # bn1 comes before conv1: folding it into conv1 would be wrong
        def __init__(self) -> None:
            super().__init__()
            self.bn1, self.conv1 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv1(torch.relu(self.bn1(x)))

    block = PreActBlock().double()
    _randomise_batchnorm(block)
    block.eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(fold_batchnorm(block)(x), block(x), rtol=0, atol=1e-12)


def test_a_hooked_module_is_not_folded_and_its_hook_fires():
    model = create_model("dacnn14", width=8, num_classes=10).eval()
    calls = []
    conv = model.stages[0][0][0]  # an AnchoredConv2d use of the shared kernel
    conv.register_forward_hook(lambda *a: calls.append(1))
    folded = fold_batchnorm(model)
    with torch.no_grad():
        folded(torch.randn(1, 3, 32, 32))
    assert calls == [1]
    assert isinstance(folded.stages[0][0][1], nn.BatchNorm2d)


def test_evaluate_gives_the_same_figures_folded_or_not():
    torch.manual_seed(0)
    model = create_model("dacnn14", width=8, num_classes=10)
    _randomise_batchnorm(model)
    split = random_split(n=96, shape=(32, 32, 3), seed=0)
    loader = DeviceLoader(split, batch_size=40)
    a = evaluate(model, loader, torch.device("cpu"), fold_bn=False)
    b = evaluate(model, loader, torch.device("cpu"))
    assert a.acc == b.acc and a.n == b.n == 96
    assert abs(a.loss - b.loss) <= 1e-5 * max(1.0, abs(a.loss))
    assert model.training  # mode restored
