"""Tying over the whole registry (issue 10): for every registered model with a shared kernel, one
tensor in ``parameters()``, gradient = sum over uses, an optimizer step keeps it tied, and
state_dict / safetensors / ``assign=True`` / meta-device round trips keep it one tensor.

The free reference is :func:`dacnn.untie` of a copy (each use becomes a free conv holding a copy of
the kernel), so every family is covered without a hand-written twin. Small models, batch 2.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from dacnn import count_params, untie
from dacnn.shared_kernel import AnchoredConv2d, anchored_uses, iter_shared_kernels
from test_model_interface import SHARED, input_size, small


def _x(model: torch.nn.Module, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(2, *input_size(model), generator=torch.Generator().manual_seed(2), dtype=dtype)


def _loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), torch.tensor([0, 1]))


def _use_names(model: torch.nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, AnchoredConv2d):
            names.setdefault(id(m.kernel), []).append(n)
    return names


def _assert_one_tensor_per_kernel(model: torch.nn.Module) -> None:
    params = [p for _, p in model.named_parameters(remove_duplicate=False)]
    for _, kernel in iter_shared_kernels(model):
        if id(kernel) in anchored_uses(model):
            assert sum(p is kernel.weight for p in params) == 1
    owners = {id(k) for _, k in iter_shared_kernels(model)}
    assert all(id(m.kernel) in owners for m in model.modules() if isinstance(m, AnchoredConv2d))
    assert not any(dict(m.named_parameters(recurse=False)) for m in model.modules()
                   if isinstance(m, AnchoredConv2d))


def _same_output(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = _x(a, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", SHARED)
def test_one_tensor_and_gradient_is_sum_over_uses(name: str) -> None:
    model = small(name).eval()  # eval: no dropout, BN statistics fixed
    big = count_params(model).unique > 5_000_000  # float64 convs have no fast CPU kernels
    dtype = torch.float32 if big else torch.float64
    tol = {"rtol": 1e-4, "atol": 1e-6} if big else {"rtol": 1e-8, "atol": 1e-10}
    model = model.to(dtype)
    _assert_one_tensor_per_kernel(model)
    uses = _use_names(model)
    free = copy.deepcopy(model)
    untie(free)
    x = _x(model, dtype)
    loss, loss_free = _loss(model, x), _loss(free, x)
    torch.testing.assert_close(loss, loss_free, **tol)
    loss.backward()
    loss_free.backward()
    free_modules = dict(free.named_modules(remove_duplicate=False))
    for _, kernel in iter_shared_kernels(model):
        names = uses.get(id(kernel), [])
        if len(names) < 2:
            continue
        distinct = {id(free_modules[n]): free_modules[n] for n in names}.values()  # a use under 2 parents
        torch.testing.assert_close(kernel.weight.grad, sum(m.weight.grad for m in distinct), **tol)


@pytest.mark.parametrize("name", SHARED)
def test_optimizer_step_keeps_the_tie(name: str) -> None:
    model = small(name).train()
    n_params = len(list(model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params
    for _ in range(2):
        opt.zero_grad()
        _loss(model, _x(model, torch.float32)).backward()
        opt.step()
    _assert_one_tensor_per_kernel(model)
    assert len(list(model.parameters())) == n_params
    free = copy.deepcopy(model)
    untie(free)  # every use of the stepped model applies the stepped kernel
    free_modules = dict(free.named_modules(remove_duplicate=False))
    for _, kernel in iter_shared_kernels(model):
        for n in _use_names(model).get(id(kernel), []):
            assert torch.equal(free_modules[n].weight, kernel.weight)


@pytest.mark.parametrize("name", SHARED)
def test_round_trips_keep_one_tensor(name: str, tmp_path) -> None:
    model = small(name).eval()
    counts = count_params(model)
    state = model.state_dict()
    kernel_keys = [f"{q}.weight" for q, _ in iter_shared_kernels(model)]
    assert all(k in state for k in kernel_keys)
    use_names = [u for us in _use_names(model).values() for u in us]
    assert not [k for k in state if any(k.startswith(f"{u}.") for u in use_names)]  # uses own nothing

    copied = small(name)
    copied.load_state_dict(state)
    assigned = small(name)
    assigned.load_state_dict(copy.deepcopy(state), assign=True)
    with torch.device("meta"):
        on_meta = small(name)
    on_meta.to_empty(device="cpu")
    on_meta.load_state_dict(state)
    path = tmp_path / "m.safetensors"
    save_model(model, str(path))
    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
    assert set(kernel_keys) <= stored and len(stored) == len(state)
    from_file = small(name)
    missing, unexpected = load_model(from_file, str(path))
    assert not missing and not unexpected
    for other in (copied, assigned, on_meta, from_file):
        _assert_one_tensor_per_kernel(other)
        assert count_params(other) == counts
        _same_output(model, other)
    # after assign=True the uses apply the assigned tensors, not the ones the model was built with
    kernel = dict(iter_shared_kernels(assigned))[kernel_keys[0].removesuffix(".weight")]
    with torch.no_grad():
        kernel.weight.mul_(0.0)
    assert not torch.equal(_forward(assigned), _forward(model))


def _forward(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_x(model, torch.float32))
