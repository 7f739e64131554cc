"""The sharing core on the DACNN models: one anchored kernel is one tensor (paper eq. 3 and 6).

It appears once in ``parameters()`` and ``state_dict()``; its gradient is the sum of the gradients
its uses would get as free weights (checked against the free twin with tied initial weights); an
optimizer step moves it once and every use keeps applying it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dacnn import AnchoredConv2d, count_params, create_model, list_models
from dacnn.shared_kernel import anchored_uses, iter_shared_kernels

# Small configurations of every DACNN kind: plain, residual (+ regulators), mixed VGG/ResNet templates.
CONFIGS = {
    "plain": ("dacnn", {"depth": 7, "width": 8, "num_classes": 5}),
    "residual_reg": ("dacnn", {"depth": 18, "width": 8, "regulators": "all", "num_classes": 5}),
    "mix_vgg": ("dacnn14_mix", {"width": 4, "num_classes": 5}),
    "mix_resnet_reg": ("dacnn18_mix_reg", {"width": 4, "num_classes": 5}),
    "no_bn": ("dacnn", {"depth": 9, "width": 8, "batchnorm": False, "num_classes": 5}),
}



def _build(key: str, shared: bool) -> nn.Module:
    name, kwargs = CONFIGS[key]
    torch.manual_seed(0)
    return create_model(name, shared=shared, **kwargs).double()


def _tied_twin(shared_model: nn.Module, key: str) -> nn.Module:
    """The free twin holding the shared model's weights: each anchored use gets a copy of its kernel."""
    free = _build(key, shared=False)
    uses = {n: m for n, m in shared_model.named_modules() if isinstance(m, AnchoredConv2d)}
    kernels = {n for n, _ in iter_shared_kernels(shared_model)}
    result = free.load_state_dict(shared_model.state_dict(), strict=False)
    expected_missing = [f"{n}.{t}" for n, m in uses.items() for t in ("weight", "bias")
                        if t == "weight" or m.kernel.bias is not None]
    assert sorted(result.missing_keys) == sorted(expected_missing)
    assert {k.rsplit(".", 1)[0] for k in result.unexpected_keys} == kernels
    with torch.no_grad():
        for name, use in uses.items():
            conv = free.get_submodule(name)
            conv.weight.copy_(use.kernel.weight)
            if use.kernel.bias is not None:
                conv.bias.copy_(use.kernel.bias)
    return free


def _use_names(model: nn.Module, kernel: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, AnchoredConv2d) and m.kernel is kernel]


def _loss(model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, *model.info.input_size, generator=gen, dtype=torch.float64)
    return F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("name", list_models("dacnn*"))
def test_kernel_is_one_tensor(name: str) -> None:
    model = create_model(name)
    kernels = list(iter_shared_kernels(model))
    assert kernels, f"{name} has no shared kernel"
    all_params = [p for _, p in model.named_parameters(remove_duplicate=False)]
    state = model.state_dict()
    uses = anchored_uses(model)
    for qualname, kernel in kernels:
        assert sum(p is kernel.weight for p in all_params) == 1
        holders = [k for k, t in state.items() if t.data_ptr() == kernel.weight.data_ptr()]
        assert holders == [f"{qualname}.weight"]
        assert uses[id(kernel)] >= 1  # the tree is the one count of uses (no counter on the kernel)
    assert len(state) == len(set(t.data_ptr() for t in state.values() if t.numel()))  # no aliases


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_gradient_is_sum_over_uses(key: str) -> None:
    shared = _build(key, shared=True).train()
    free = _tied_twin(shared, key).train()
    loss_shared, loss_free = _loss(shared), _loss(free)
    torch.testing.assert_close(loss_shared, loss_free)
    loss_shared.backward()
    loss_free.backward()

    free_modules = dict(free.named_modules())
    for _, kernel in iter_shared_kernels(shared):
        use_names = _use_names(shared, kernel)
        summed = sum(free_modules[n].weight.grad for n in use_names)
        torch.testing.assert_close(kernel.weight.grad, summed, rtol=1e-9, atol=1e-12)
        if kernel.bias is not None:
            summed_bias = sum(free_modules[n].bias.grad for n in use_names)
            torch.testing.assert_close(kernel.bias.grad, summed_bias, rtol=1e-9, atol=1e-12)
    free_params = dict(free.named_parameters())
    for name, p in shared.named_parameters():  # everything that is not shared: the same gradient
        if name in free_params:
            torch.testing.assert_close(p.grad, free_params[name].grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("key", ["plain", "mix_resnet_reg"])
def test_optimizer_step_keeps_kernel_tied(key: str) -> None:
    shared = _build(key, shared=True).train()
    free = _tied_twin(shared, key).train()
    _loss(free).backward()
    before = {id(k): k.weight.detach().clone() for _, k in iter_shared_kernels(shared)}

    lr = 0.1
    opt = torch.optim.SGD(shared.parameters(), lr=lr)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(shared.parameters()))
    _loss(shared).backward()
    opt.step()

    free_modules = dict(free.named_modules())
    owners = dict(iter_shared_kernels(shared))
    for kernel in owners.values():
        use_names = _use_names(shared, kernel)
        expected = before[id(kernel)] - lr * sum(free_modules[n].weight.grad for n in use_names)
        torch.testing.assert_close(kernel.weight.detach(), expected, rtol=1e-9, atol=1e-12)
    owner_ids = {id(k) for k in owners.values()}
    assert all(id(m.kernel) in owner_ids for m in shared.modules() if isinstance(m, AnchoredConv2d))
    # the updated kernel is what every use applies: the twin re-tied from it computes the same loss
    torch.testing.assert_close(_loss(shared), _loss(_tied_twin(shared, key)))


def test_copies_and_loads_keep_tying() -> None:
    """deepcopy and load_state_dict (copy or assign) keep every use pointing at its owner."""
    model = create_model("dacnn18_mix", width=4)
    counts = count_params(model)
    clone = copy.deepcopy(model)
    fresh = create_model("dacnn18_mix", width=4)
    fresh.load_state_dict(model.state_dict(), assign=True)
    for other in (clone, fresh):
        assert count_params(other) == counts
        owners = {id(k) for _, k in iter_shared_kernels(other)}
        assert all(m.kernel is not None and id(m.kernel) in owners
                   for m in other.modules() if isinstance(m, AnchoredConv2d))
    with torch.no_grad():
        next(k for _, k in iter_shared_kernels(clone)).weight.add_(1.0)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), clone.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
        assert not torch.equal(model(x), clone(x))  # the clone owns its own kernel


@pytest.mark.parametrize("name", list_models("dacnn*"))
def test_free_twin_shares_nothing(name: str) -> None:
    free = create_model(name, shared=False)
    assert not list(iter_shared_kernels(free))
    assert not any(isinstance(m, AnchoredConv2d) for m in free.modules())
