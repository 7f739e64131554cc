"""ConvMixer with inter-layer kernel sharing (arXiv 2210.14151; SPEC.md 1.1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dacnn import count_params, create_model
from dacnn.errors import ConfigError
from dacnn.models.convmixer import ConvMixer
from dacnn.shared_kernel import AnchoredConv2d, SharedKernel

SPEC = {  # (shared, classes) -> unique parameters, SPEC.md 1.1 [verified]
    (False, 10): 1_409_034, (True, 10): 107_274, (False, 100): 1_432_164, (True, 100): 130_404,
}


def formula(h: int, d: int, k: int, p: int, c: int, shared: bool) -> int:
    """SPEC.md 1.1 closed forms."""
    embed, head = 3 * h * p * p + h + 2 * h, h * c + c
    if shared:
        return embed + (h * k * k + h + h * h + h) + d * 4 * h + head
    return embed + d * (h * k * k + h + h * h + h + 4 * h) + head


@pytest.mark.parametrize("shared,classes", sorted(SPEC))
def test_counts_equal_spec(shared: bool, classes: int) -> None:
    name = "convmixer_256_16" + ("_shared" if shared else "")
    model = create_model(name, num_classes=classes)
    counts = count_params(model)
    assert counts.unique == SPEC[(shared, classes)] == formula(256, 16, 9, 1, classes, shared)
    assert counts.per_use == SPEC[(False, classes)]  # the free twin's size
    assert model.info.num_classes == classes


def test_defaults_recorded_in_model_info() -> None:
    model = create_model("convmixer_256_16_shared")
    assert model.info.num_classes == 10 and model.info.shared_twin == "convmixer_256_16"


def test_shared_tensors_weights_and_biases_each_used_depth_times() -> None:
    model = create_model("convmixer_256_16_shared")
    counts = count_params(model)
    shapes = sorted((s.shape, s.uses) for s in counts.shared)
    assert shapes == sorted([((256,), 16), ((256,), 16), ((256, 1, 9, 9), 16), ((256, 256, 1, 1), 16)])
    kernels = [m for m in model.modules() if isinstance(m, SharedKernel)]
    assert len(kernels) == 2 and {k.groups for k in kernels} == {256, 1}
    assert all(k.bias is not None for k in kernels)
    # BatchNorms stay free: two per layer plus the embedding's
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 2 * 16 + 1


@pytest.mark.parametrize("h,d,k,p", [(16, 3, 5, 2), (8, 2, 3, 1), (12, 4, 7, 1)])
def test_any_size_matches_formula(h: int, d: int, k: int, p: int) -> None:
    for shared in (False, True):
        model = ConvMixer(h, d, kernel_size=k, patch_size=p, shared=shared, num_classes=7)
        assert count_params(model).unique == formula(h, d, k, p, 7, shared)
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def _functional(model: ConvMixer, x: torch.Tensor, dw: list, pw: list) -> torch.Tensor:
    """The ConvMixer forward written out: conv -> GELU -> BN, residual only around the depthwise conv."""
    def bn(m: torch.nn.BatchNorm2d, t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    conv, _, norm = model.patch_embed
    x = bn(norm, F.gelu(F.conv2d(x, conv.weight, conv.bias, stride=conv.stride)))
    for layer, (dw_w, dw_b), (pw_w, pw_b) in zip(model.layers, dw, pw):
        k = dw_w.shape[-1]
        x = x + bn(layer[0].fn[2], F.gelu(F.conv2d(x, dw_w, dw_b, padding=k // 2, groups=x.shape[1])))
        x = bn(layer[3], F.gelu(F.conv2d(x, pw_w, pw_b)))
    return model.fc(x.mean((2, 3)))


def test_forward_is_convmixer_and_shared_gradient_is_sum_over_uses() -> None:
    torch.manual_seed(0)
    shared = ConvMixer(8, 3, kernel_size=3, shared=True, num_classes=5).eval()
    free = ConvMixer(8, 3, kernel_size=3, shared=False, num_classes=5).eval()
    free.load_state_dict(shared.state_dict(), strict=False)  # embed, BNs, head
    for layer in free.layers:  # every free conv gets the shared values
        layer[0].fn[0].weight.data.copy_(shared.kernels.depthwise.weight)
        layer[0].fn[0].bias.data.copy_(shared.kernels.depthwise.bias)
        layer[1].weight.data.copy_(shared.kernels.pointwise.weight)
        layer[1].bias.data.copy_(shared.kernels.pointwise.bias)
    for m in list(shared.modules()) + list(free.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.fill_(1.5)
    x = torch.randn(2, 3, 8, 8)
    dw = [(shared.kernels.depthwise.weight, shared.kernels.depthwise.bias)] * 3
    pw = [(shared.kernels.pointwise.weight, shared.kernels.pointwise.bias)] * 3
    torch.testing.assert_close(shared(x), _functional(shared, x, dw, pw))
    torch.testing.assert_close(free(x), shared(x))
    shared(x).sum().backward()
    free(x).sum().backward()
    summed = sum(layer[0].fn[0].weight.grad for layer in free.layers)
    torch.testing.assert_close(shared.kernels.depthwise.weight.grad, summed)
    summed_bias = sum(layer[1].bias.grad for layer in free.layers)
    torch.testing.assert_close(shared.kernels.pointwise.bias.grad, summed_bias)
    assert all(isinstance(layer[1], AnchoredConv2d) for layer in shared.layers)


def test_bad_sizes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="depth"):
        ConvMixer(8, 0)
