"""``share_kernels`` on model code it was not written for: it ties safely or leaves the conv free.

Each model below carries one trap seen in third-party model zoos (a weight-standardised conv, a
scaled one with a ``gain``, a "same"-padding conv that pads in ``forward``, ``weight_norm``,
``spectral_norm``, a hooked conv, a frozen conv, a module iterating its children, an ``nn.Sequential``
subclass root, a ``ModuleList`` user, blocks named without digits). For every one the same checks run
(:func:`_check`): the function is the original's with each group's first kernel copied into its
members (eval mode, rtol 1e-5), no parameter vanished and the report adds up, gradients reach every
parameter (a kernel's is the sum of its members'), an optimizer step keeps the uses tied, ``untie``
gives back the original names, classes and count (the original checkpoint loads), and state_dict,
``torch.save`` and safetensors round trips restore the shared model.
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from torch.nn.utils import parametrizations

from _helpers import first_kernel_copied
from dacnn import AnchoredConv2d, count_params, share_kernels, untie


# ---- the traps ------------------------------------------------------------------------------------
class WSConv2d(nn.Conv2d):
    """Weight standardisation (Qiao et al.; BiT/NFNet code): the kernel is normalised in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """NFNet's scaled weight-standardised conv: an extra ``gain`` parameter."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True)
        w = w.reshape_as(self.weight) * self.gain
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dSame(nn.Conv2d):
    """TensorFlow "SAME" padding done in forward, declared with ``padding=0``."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)


class GainConv2d(nn.Conv2d):
    """Keeps Conv2d's forward but registers a parameter its parent reads."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((1,), 2.0))


class PlainSubclass(nn.Conv2d):
    """A subclass that changes nothing about the function: safe to tie, and untie gives it back."""


def conv(cin: int = 8, cout: int = 8, cls: type = nn.Conv2d, **kw: object) -> nn.Conv2d:
    kw.setdefault("padding", 1)
    return cls(cin, cout, 3, **kw)


class Block(nn.Module):
    def __init__(self, c: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = c, nn.BatchNorm2d(c.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if isinstance(self.conv, GainConv2d):
            out = out * self.conv.gain
        return x + F.relu(self.bn(out))


class Chain(nn.Module):
    """stem 3 -> 8, then blocks of 8 -> 8 3x3 convs at one resolution, then a linear head."""

    def __init__(self, *convs: nn.Module) -> None:
        super().__init__()
        self.stem = conv(3, 8)
        self.blocks = nn.Sequential(*(Block(c) for c in convs))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class IterChildren(nn.Module):
    """Model-zoo style: ``for block in self.children(): x = block(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a, self.act, self.b, self.c = conv(3, 8), conv(), nn.ReLU(), conv(), conv()
        self.pool, self.flat = nn.AdaptiveAvgPool2d(1), nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.children():
            x = block(x)
        return x


class MySequential(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self:
            x = module(x)
        return x * 0.5


class UsesModuleList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv(3, 8)
        self.layers = nn.ModuleList(Block(conv()) for _ in range(3))
        self.extra = nn.ModuleDict({"left": Block(conv()), "right": Block(conv())})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return sum(m(x) for m in self.extra.values())


class Stage(nn.Module):
    """Blocks named without digits."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.third = Block(conv()), Block(conv()), Block(conv())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.third(self.second(self.first(x)))


class NamedStages(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stage_a, self.stage_b = conv(3, 8), Stage(), Stage()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage_b(self.stage_a(self.stem(x)))


class DenseStyle(nn.Module):
    """DenseNet's names: ``denseblock1.denselayer1.conv`` (ModuleDict blocks, digits inside names)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv(3, 8)
        self.denseblock1 = nn.ModuleDict({f"denselayer{i}": Block(conv()) for i in (1, 2)})
        self.denseblock2 = nn.ModuleDict({f"denselayer{i}": Block(conv()) for i in (1, 2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in (self.denseblock1, self.denseblock2):
            for layer in block.values():
                x = layer(x)
        return x


def _hooked() -> nn.Module:
    model = Chain(conv(), conv(), conv())
    model.blocks[1].conv.register_forward_hook(lambda m, args, out: out * 3.0)
    model.blocks[2].conv.register_forward_pre_hook(lambda m, args: (args[0].flip(-1),))
    return model


def _frozen() -> nn.Module:
    model = Chain(conv(), conv(), conv(), conv(), conv())
    for i in (1, 3):
        model.blocks[i].conv.requires_grad_(False)
    model.blocks[4].conv.weight.requires_grad_(False)  # frozen weight, trainable bias: alone
    return model


def _aliased() -> nn.Module:
    model = Chain(conv(), conv(), conv(), conv())
    model.blocks[3].conv.weight = model.blocks[2].conv.weight  # Parameter aliasing, not ours to re-tie
    return model


# (id, builder, share_kernels kwargs, {free conv: reason regex}, expected groups)
B = "blocks.{}.conv"
CASES: list[tuple[str, Callable[[], nn.Module], dict, dict[str, str], list[list[str]]]] = [
    ("weight_standardised", lambda: Chain(conv(), conv(cls=WSConv2d), conv(), conv()), {},
     {B.format(1): "WSConv2d overrides forward"}, [[B.format(i) for i in (0, 2, 3)]]),
    ("scaled_std_gain", lambda: Chain(conv(), conv(), conv(cls=ScaledStdConv2d)), {},
     {B.format(2): "ScaledStdConv2d overrides forward"}, [[B.format(0), B.format(1)]]),
    ("same_padding_in_forward", lambda: Chain(conv(), conv(cls=Conv2dSame, padding=0), conv()), {},
     {B.format(1): "Conv2dSame overrides _conv_forward"}, [[B.format(0), B.format(2)]]),
    ("extra_parameter", lambda: Chain(conv(), conv(cls=GainConv2d), conv()), {},
     {B.format(1): "parameters other than weight/bias: gain"}, [[B.format(0), B.format(2)]]),
    ("plain_subclass", lambda: Chain(conv(), conv(cls=PlainSubclass), conv()), {},
     {}, [[B.format(i) for i in range(3)]]),
    ("weight_norm", lambda: Chain(conv(), parametrizations.weight_norm(conv()), conv()), {},
     {B.format(1): r"parametrized \(weight\)"}, [[B.format(0), B.format(2)]]),
    ("spectral_norm", lambda: Chain(parametrizations.spectral_norm(conv()), conv(), conv()), {},
     {B.format(0): r"parametrized \(weight\)"}, [[B.format(1), B.format(2)]]),
    ("hooked", _hooked, {},
     {B.format(1): "_forward_hooks", B.format(2): "_forward_pre_hooks"}, []),
    ("frozen", _frozen, {},
     {B.format(4): "no isomorphic conv"}, [[B.format(0), B.format(2)], [B.format(1), B.format(3)]]),
    ("parameter_alias", _aliased, {},
     {B.format(2): "aliasing", B.format(3): "aliasing"}, [[B.format(0), B.format(1)]]),
    ("reflect_padding", lambda: Chain(conv(), conv(padding_mode="reflect"), conv()), {},
     {B.format(1): "padding_mode='reflect'"}, [[B.format(0), B.format(2)]]),
    ("iterates_children", IterChildren, {}, {"stem": "no isomorphic"}, [["a", "b", "c"]]),
    ("sequential_subclass_root",
     lambda: MySequential(conv(3, 8), nn.ReLU(), conv(), nn.BatchNorm2d(8), conv(), conv(cls=WSConv2d)), {},
     {"0": "no isomorphic", "5": "overrides forward"}, [["2", "4"]]),
    ("module_list_and_dict", UsesModuleList, {},
     {"stem": "no isomorphic"},
     [[f"layers.{i}.conv" for i in range(3)] + ["extra.left.conv", "extra.right.conv"]]),
    ("blocks_without_digits", NamedStages, dict(scope="container"), {"stem": "no isomorphic"},
     [[f"stage_{s}.{b}.conv" for b in ("first", "second", "third")] for s in "ab"]),
    ("named_containers", NamedStages, dict(scope="container", containers="stage_b"),
     {"stem": "no module matched by containers", "stage_a.first.conv": "containers",
      "stage_a.third.conv": "containers"},
     [[f"stage_b.{b}.conv" for b in ("first", "second", "third")]]),
    ("densenet_names", DenseStyle, dict(scope="container"), {"stem": "no isomorphic"},
     [[f"denseblock{s}.denselayer{i}.conv" for i in (1, 2)] for s in (1, 2)]),
]


# ---- the checks -----------------------------------------------------------------------------------
def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _check(build: Callable[[], nn.Module], kwargs: dict, free: dict[str, str], tied: list[list[str]],
           tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    original = build()
    x = torch.randn(2, 3, 12, 12)
    original.train()(x)  # BatchNorm running statistics that are not the identity
    shared = copy.deepcopy(original)
    report = share_kernels(shared, example_input=x, **kwargs)

    # what was tied and what stays free, with the reason
    assert [g.uses for g in report.groups] == tied
    for name, pattern in free.items():
        assert re.search(pattern, report.skipped.get(name, "")), (name, report.skipped)
    tied_names = {u for g in report.groups for u in g.uses}
    convs = {n for n, m in original.named_modules() if isinstance(m, nn.Conv2d)}
    assert tied_names | set(report.skipped) == convs and not tied_names & set(report.skipped)

    # the report adds up and no parameter vanished
    count, count_before = count_params(shared), count_params(original)
    assert report.params_before == sum(p.numel() for p in original.parameters()) == count_before.unique
    assert report.params_before - sum(g.saved for g in report.groups) == report.params_after == count.unique
    assert count.per_use == count_before.per_use  # == params_before for a model without tied tensors
    if not count_before.shared:
        assert count.per_use == report.params_before
    after = dict(shared.named_parameters())
    for name, p in original.named_parameters():
        if name.rpartition(".")[0] in tied_names:
            continue
        torch.testing.assert_close(after.pop(name), p, rtol=0, atol=0)
        assert after.get(name) is None
    assert sorted(after) == sorted(f"{g.kernel}.{k}" for g in report.groups
                                   for k in ("weight", "bias") if f"{g.kernel}.{k}" in after)

    # the function: eval mode, against the original with each group's first kernel copied in
    expected = first_kernel_copied(original, report)
    torch.testing.assert_close(_out(shared, x), _out(expected, x), rtol=1e-5, atol=1e-6)

    # gradients reach every parameter; a kernel's is the sum of its members' in the twin
    for model in (shared, expected):
        model.train()
        model(x).square().mean().backward()
    for name, p in shared.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    for g in report.groups:
        kernel = shared.get_submodule(g.kernel)
        if kernel.weight.requires_grad:
            total = sum(expected.get_submodule(u).weight.grad for u in g.uses)
            torch.testing.assert_close(kernel.weight.grad, total, rtol=1e-5, atol=1e-6)

    # one optimizer step keeps the uses tied (and frozen kernels frozen)
    params = list(shared.parameters())
    assert len(params) == len({id(p) for p in params})
    before = {g.kernel: shared.get_submodule(g.kernel).weight.detach().clone() for g in report.groups}
    torch.optim.SGD(params, lr=0.1).step()
    for g in report.groups:
        kernel = shared.get_submodule(g.kernel)
        assert all(shared.get_submodule(u).kernel is kernel for u in g.uses)
        assert torch.equal(kernel.weight, before[g.kernel]) != kernel.weight.requires_grad
    stepped = copy.deepcopy(shared)
    untie(stepped)
    for g in report.groups:
        weights = [stepped.get_submodule(u).weight for u in g.uses]
        assert all(torch.equal(w, weights[0]) for w in weights)

    # untie: original names, classes and count; the original checkpoint loads and computes the same
    untied = copy.deepcopy(shared)
    assert sorted(untie(untied)) == sorted(tied_names)
    assert [n for n, _ in untied.named_parameters()] == [n for n, _ in original.named_parameters()]
    assert list(untied.state_dict()) == list(original.state_dict())
    assert [type(m) for m in untied.modules()] == [type(m) for m in original.modules()]
    assert [p.requires_grad for p in untied.parameters()] == [p.requires_grad for p in original.parameters()]
    untied.load_state_dict(original.state_dict())
    torch.testing.assert_close(_out(untied, x), _out(original, x), rtol=0, atol=0)

    # state_dict, torch.save and safetensors round trips into a freshly shared model
    def fresh() -> nn.Module:
        model = copy.deepcopy(original)
        share_kernels(model, example_input=x, **kwargs)
        return model

    target = _out(shared, x)
    via_dict = fresh()
    via_dict.load_state_dict(shared.state_dict())
    buffer = io.BytesIO()
    torch.save(shared.state_dict(), buffer)
    buffer.seek(0)
    via_file = fresh()
    via_file.load_state_dict(torch.load(buffer, weights_only=True))
    save_model(shared, str(tmp_path / "shared.safetensors"))
    via_safetensors = fresh()
    load_model(via_safetensors, str(tmp_path / "shared.safetensors"))
    for model in (via_dict, via_file, via_safetensors):
        torch.testing.assert_close(_out(model, x), target, rtol=0, atol=0)
        assert count_params(model).unique == report.params_after


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_ties_safely_or_leaves_free(case: tuple, tmp_path) -> None:  # noqa: ANN001
    _, build, kwargs, free, tied = case
    _check(build, kwargs, free, tied, tmp_path)


def test_naive_tying_would_have_changed_these() -> None:
    """The traps are real: plain convs in their place compute something else (so the checks can fail)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    for cls, kw in ((WSConv2d, {}), (ScaledStdConv2d, {}), (Conv2dSame, {"padding": 0})):
        trap = conv(cls=cls, **kw)
        plain = conv(**kw)
        plain.load_state_dict(trap.state_dict(), strict=False)
        y = torch.randn(2, 8, 12, 12)
        assert plain(y).shape != trap(y).shape or not torch.allclose(plain(y), trap(y))
    hooked = _hooked().eval()
    free = copy.deepcopy(hooked)
    for b in free.blocks:
        b.conv._forward_hooks.clear()
        b.conv._forward_pre_hooks.clear()
    assert not torch.allclose(_out(hooked, x), _out(free, x))


def test_stage_scope_ties_what_container_scope_keeps_apart() -> None:
    """Same resolution, two named stages: 'stage' makes one group, 'container' one per stage."""
    model = NamedStages()
    report = share_kernels(model, scope="stage", example_input=torch.randn(1, 3, 8, 8))
    assert [len(g.uses) for g in report.groups] == [6]
    flat = nn.Sequential(conv(3, 8), conv(), nn.MaxPool2d(2), conv(), conv())
    # a flat Sequential is one container: "container" is "global" there (documented); "stage" splits
    assert [len(g.uses) for g in share_kernels(copy.deepcopy(flat), scope="container").groups] == [3]
    assert [len(g.uses) for g in share_kernels(copy.deepcopy(flat), scope="stage").groups] == [2]


def test_reading_weight_of_a_use_says_to_untie() -> None:
    model = Chain(conv(), conv())
    share_kernels(model, scope="global")
    with pytest.raises(AttributeError, match=r"untie\(model\)"):
        model.blocks[1].conv.weight  # noqa: B018
    assert not hasattr(model.blocks[1].conv, "bias")
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        model.blocks[1].conv.nonsense  # noqa: B018
    assert isinstance(model.blocks[1].conv, AnchoredConv2d)


def test_sharing_draws_no_random_numbers_and_keeps_the_first_tensor() -> None:
    """The kernel *is* the first conv's parameter: an optimizer built before sharing still drives it."""
    torch.manual_seed(0)
    model = Chain(conv(), conv(), conv())
    first = model.blocks[0].conv.weight
    state = torch.random.get_rng_state()
    report = share_kernels(model, scope="global")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.get_submodule(report.groups[0].kernel).weight is first
    assert model.blocks[1].conv.kernel is model.blocks[0].conv.kernel


def test_share_twice_and_untie_twice() -> None:
    model = Chain(conv(), conv(), conv())
    first = share_kernels(model, scope="global")
    again = share_kernels(model, scope="global")
    assert len(first.groups) == 1 and again.groups == [] and again.params_after == first.params_after
    assert len(untie(model)) == 3 and untie(model) == []
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 4
