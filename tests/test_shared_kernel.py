"""The sharing core (:mod:`dacnn.shared_kernel`): one anchored kernel is one tensor (DACNN paper eq. 3, 6).

On every registered model with a shared kernel (``native``) and on one free model per family tied by
:func:`dacnn.share_kernels` (``plugin``): the kernel appears once in ``parameters()`` and
``state_dict()``; its gradient is the sum of the gradients its uses would get as free weights; an
optimizer step keeps it tied; copies, loads and safetensors files keep it one tensor. The free
reference is :func:`dacnn.untie` of a copy. On the DACNN builders the gradient and the SGD step are
also checked against a free twin built with ``shared=False`` and tied by hand. Small models.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from _helpers import shared_model_names, small_input, small_model
from dacnn import AnchoredConv2d, count_params, create_model, list_models, model_info, share_kernels, untie
from dacnn.shared_kernel import anchored_uses, iter_shared_kernels

NATIVE = shared_model_names()
PLUGIN = ["airbench94", "convmixer_256_16", "resnet18", "se_resnet_d_2", "sharesnet164", "vgg16_1fc",
          "wrn40_4"]  # one free model per family
CASES = [pytest.param("native", n, id=f"native-{n}") for n in NATIVE]
CASES += [pytest.param("plugin", n, id=f"plugin-{n}") for n in PLUGIN]


def _build(kind: str, name: str, meta: bool = False) -> nn.Module:
    """``name`` small; for ``plugin`` then tied by ``share_kernels``. ``meta``: built on the meta device."""
    if meta:
        with torch.device("meta"):
            model = small_model(name)
    else:
        model = small_model(name)
    if kind == "plugin":
        x = small_input(model)
        share_kernels(model, example_input=x.to("meta") if meta else x)
    return model


def _x(model: nn.Module, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return small_input(model, 2, seed=2).to(dtype)


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), torch.tensor([0, 1]))


def _use_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, AnchoredConv2d):
            names.setdefault(id(m.kernel), []).append(n)
    return names


def _assert_one_tensor_per_kernel(model: nn.Module) -> None:
    """The model has kernels, each applied at least once, registered once in ``parameters()`` and under
    one key of ``state_dict()`` (no aliased keys); every use applies a kernel the model owns and owns
    no parameter itself."""
    params = [p for _, p in model.named_parameters(remove_duplicate=False)]
    state = model.state_dict()
    uses = anchored_uses(model)  # the tree is the one count of uses (no counter on the kernel)
    kernels = list(iter_shared_kernels(model))
    assert kernels, "no shared kernel"
    for qualname, kernel in kernels:
        assert uses.get(id(kernel), 0) >= 1
        assert sum(p is kernel.weight for p in params) == 1
        holders = [k for k, t in state.items() if t.data_ptr() == kernel.weight.data_ptr()]
        assert holders == [f"{qualname}.weight"]
    assert len(state) == len(set(t.data_ptr() for t in state.values() if t.numel()))  # no aliases
    owners = {id(k) for _, k in iter_shared_kernels(model)}
    assert all(id(m.kernel) in owners for m in model.modules() if isinstance(m, AnchoredConv2d))
    assert not any(dict(m.named_parameters(recurse=False)) for m in model.modules()
                   if isinstance(m, AnchoredConv2d))


def _forward(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_x(model, torch.float32))


def _same_output(a: nn.Module, b: nn.Module) -> None:
    torch.testing.assert_close(_forward(a), _forward(b), rtol=0, atol=0)


def test_plugin_cases_cover_every_family_with_a_free_model() -> None:
    free = {model_info(n).family for n in list_models() if n not in NATIVE}
    assert {model_info(n).family for n in PLUGIN} == free


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_one_tensor_and_gradient_is_sum_over_uses(kind: str, name: str) -> None:
    model = _build(kind, name).eval()  # eval: no dropout, BN statistics fixed
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


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_optimizer_step_keeps_the_tie(kind: str, name: str) -> None:
    model = _build(kind, name).train()
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


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_copies_and_loads_keep_one_tensor(kind: str, name: str) -> None:
    """``load_state_dict`` (copy or ``assign=True``), ``to_empty`` after a meta-device build and
    ``deepcopy`` keep every kernel one tensor, and the uses apply the tensors the model now holds."""
    model = _build(kind, name).eval()
    counts = count_params(model)
    state = model.state_dict()
    kernel_keys = [f"{q}.weight" for q, _ in iter_shared_kernels(model)]
    assert all(k in state for k in kernel_keys)
    use_names = [u for us in _use_names(model).values() for u in us]
    # uses own nothing (share_kernels registers a group's kernel under its first use, as ``kernel``)
    own = [k for k in state if any(k.startswith(f"{u}.") for u in use_names)
           and not any(k.startswith(f"{q}.") for q, _ in iter_shared_kernels(model))]
    assert not own

    copied = _build(kind, name)
    copied.load_state_dict(state)
    assigned = _build(kind, name)
    assigned.load_state_dict(copy.deepcopy(state), assign=True)
    on_meta = _build(kind, name, meta=True)
    on_meta.to_empty(device="cpu")
    on_meta.load_state_dict(state)
    clone = copy.deepcopy(model)
    for other in (copied, assigned, on_meta, clone):
        _assert_one_tensor_per_kernel(other)
        assert count_params(other) == counts
        _same_output(model, other)
    # after assign=True the uses apply the assigned tensors, not the ones the model was built with
    applied = [q for q, k in iter_shared_kernels(model) if id(k) in anchored_uses(model)]
    kernel = dict(iter_shared_kernels(assigned))[applied[0]]
    with torch.no_grad():
        kernel.weight.mul_(0.0)
    assert not torch.equal(_forward(assigned), _forward(model))
    # the clone owns its own kernels: changing one changes the clone only
    expected = _forward(model)
    with torch.no_grad():
        dict(iter_shared_kernels(clone))[applied[0]].weight.add_(1.0)
    assert torch.equal(_forward(model), expected) and not torch.equal(_forward(clone), expected)


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_safetensors_stores_each_shared_kernel_once(kind: str, name: str, tmp_path) -> None:
    """``save_model`` and ``save_file`` (which refuses shared memory) both take the model: each kernel
    is stored once, the file holds the unique parameters and buffers plus its header, and loading it
    keeps every kernel one tensor."""
    model = _build(kind, name).eval()
    counts = count_params(model)
    state = model.state_dict()
    kernel_keys = [f"{q}.weight" for q, _ in iter_shared_kernels(model)]
    path, plain = tmp_path / "m.safetensors", tmp_path / "plain.safetensors"
    save_model(model, str(path))
    save_file(state, str(plain))
    stored = sum(t.numel() * t.element_size() for t in state.values())
    unique = sum(p.numel() * p.element_size() for p in model.parameters())
    unique += sum(b.numel() * b.element_size() for b in model.buffers())
    assert stored == unique
    with path.open("rb") as f:
        header = int.from_bytes(f.read(8), "little")
    assert path.stat().st_size == 8 + header + stored  # header only on top
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        in_file = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in keys)
    assert set(kernel_keys) <= keys and len(keys) == len(state)
    assert in_file == sum(t.numel() for t in state.values())
    from_model = _build(kind, name)
    missing, unexpected = load_model(from_model, str(path))
    assert not missing and not unexpected
    from_file = _build(kind, name)
    from_file.load_state_dict(load_file(str(plain)))
    for other in (from_model, from_file):
        _assert_one_tensor_per_kernel(other)
        assert count_params(other) == counts
        _same_output(model, other)


# ---- the DACNN builders against their free twin (``shared=False``) tied by hand ---------------------
# Small configurations of every DACNN kind: plain, residual (+ regulators), mixed VGG/ResNet templates.
CONFIGS = {
    "plain": ("dacnn", {"depth": 7, "width": 8, "num_classes": 5}),
    "residual_reg": ("dacnn", {"depth": 18, "width": 8, "regulators": "all", "num_classes": 5}),
    "mix_vgg": ("dacnn14_mix", {"width": 4, "num_classes": 5}),
    "mix_resnet_reg": ("dacnn18_mix_reg", {"width": 4, "num_classes": 5}),
    "no_bn": ("dacnn", {"depth": 9, "width": 8, "batchnorm": False, "num_classes": 5}),
}


def _dacnn(key: str, shared: bool) -> nn.Module:
    name, kwargs = CONFIGS[key]
    torch.manual_seed(0)
    return create_model(name, shared=shared, **kwargs).double()


def _tied_twin(shared_model: nn.Module, key: str) -> nn.Module:
    """The free twin holding the shared model's weights: each anchored use gets a copy of its kernel."""
    free = _dacnn(key, shared=False)
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


def _uses_of(model: nn.Module, kernel: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, AnchoredConv2d) and m.kernel is kernel]


def _dacnn_loss(model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, *model.info.input_size, generator=gen, dtype=torch.float64)
    return F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_gradient_is_the_sum_over_uses_of_the_hand_tied_free_twin(key: str) -> None:
    shared = _dacnn(key, shared=True).train()
    free = _tied_twin(shared, key).train()
    loss_shared, loss_free = _dacnn_loss(shared), _dacnn_loss(free)
    torch.testing.assert_close(loss_shared, loss_free)
    loss_shared.backward()
    loss_free.backward()

    free_modules = dict(free.named_modules())
    for _, kernel in iter_shared_kernels(shared):
        use_names = _uses_of(shared, kernel)
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
def test_sgd_step_moves_the_kernel_by_the_summed_gradient_and_keeps_it_tied(key: str) -> None:
    shared = _dacnn(key, shared=True).train()
    free = _tied_twin(shared, key).train()
    _dacnn_loss(free).backward()
    before = {id(k): k.weight.detach().clone() for _, k in iter_shared_kernels(shared)}

    lr = 0.1
    opt = torch.optim.SGD(shared.parameters(), lr=lr)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(shared.parameters()))
    _dacnn_loss(shared).backward()
    opt.step()

    free_modules = dict(free.named_modules())
    owners = dict(iter_shared_kernels(shared))
    for kernel in owners.values():
        use_names = _uses_of(shared, kernel)
        expected = before[id(kernel)] - lr * sum(free_modules[n].weight.grad for n in use_names)
        torch.testing.assert_close(kernel.weight.detach(), expected, rtol=1e-9, atol=1e-12)
    owner_ids = {id(k) for k in owners.values()}
    assert all(id(m.kernel) in owner_ids for m in shared.modules() if isinstance(m, AnchoredConv2d))
    # the updated kernel is what every use applies: the twin re-tied from it computes the same loss
    torch.testing.assert_close(_dacnn_loss(shared), _dacnn_loss(_tied_twin(shared, key)))


@pytest.mark.parametrize("name", list_models("dacnn*"))
def test_free_twin_shares_nothing(name: str) -> None:
    free = create_model(name, shared=False)
    assert not list(iter_shared_kernels(free))
    assert not any(isinstance(m, AnchoredConv2d) for m in free.modules())
