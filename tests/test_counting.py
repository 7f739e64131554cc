"""Parameter and FLOP accounting: the counts of the DACNN/VGG/ResNet families derived from their
architecture, closed forms, free twins, static vs dynamic use counting, and FLOPs that count every use
of a shared kernel."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn

from _helpers import shared_model_names, small_input, small_model
from dacnn import SharedKernel, count_flops, count_params, create_model, list_models, model_info, untie
from dacnn.counting import forward_calls, fvcore_flops, thop_custom_ops
from dacnn.models.layers import split_evenly

FAMILIES = ("dacnn", "vgg", "resnet")
DACNN_MODELS = list_models("dacnn*")
REGULATED_BLOCKS = {18: 8, 24: 11, 34: 16}  # residual blocks of DACNN-18/24/34 (one regulator each)
CLASSES = 100  # the registered defaults: 100 classes, 3x32x32 input
WIDTHS = (64, 128, 256, 512)  # the stages of the ResNet template
VGG16 = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # (width, 3x3 convs) per pooled section
RESNET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}  # BasicBlocks per stage (He et al.)


def _plain_counts(depth: int, width: int, classes: int, regulated_blocks: int = 0) -> tuple[int, int]:
    """Closed form (paper eq. 2-3): stem 3->C + BN, one CxC 3x3 kernel used depth-2 times with a BN
    per use, linear classifier; a regulator is a 1x1 CxC conv + BN."""
    c, uses = width, depth - 2
    common = 27 * c + 2 * c + uses * 2 * c + c * classes + classes + regulated_blocks * (c * c + 2 * c)
    return common + 9 * c * c, common + uses * 9 * c * c


def _conv_bn(cin: int, cout: int, k: int = 3) -> int:
    """A bias-free k x k conv and the BatchNorm after it (scale and shift)."""
    return cin * cout * k * k + 2 * cout


def _fc(cin: int, classes: int = CLASSES) -> int:
    return cin * classes + classes


def _vgg16_1fc() -> tuple[int, Counter]:
    """VGG-16 with one classifier: 13 bias-free 3x3 convs, each with its BatchNorm, then FC 512 ->
    classes. With the parameters: how many C x C 3x3 convs each width C has."""
    params, same, cin = 0, Counter(), 3
    for c, convs in VGG16:
        for _ in range(convs):
            params += _conv_bn(cin, c)
            same[c] += cin == c
            cin = c
    return params + _fc(WIDTHS[-1]), same


def _resnet(depth: int, regulated: bool = False) -> tuple[int, Counter]:
    """CIFAR ResNet-18/34: stem 3x3 conv 3 -> 64 + BN; BasicBlocks of two 3x3 convs + BN each, and a
    1x1 conv + BN projection where the width grows; ``regulated``: a regulator (1x1 C x C conv + BN)
    after every block; FC 512 -> classes. With the parameters: the C x C 3x3 convs per width C."""
    params, same, cin = _conv_bn(3, WIDTHS[0]), Counter(), WIDTHS[0]
    for c, blocks in zip(WIDTHS, RESNET_BLOCKS[depth]):
        for _ in range(blocks):
            params += _conv_bn(cin, c) + _conv_bn(c, c)
            same[c] += 1 + (cin == c)
            if cin != c:
                params += _conv_bn(cin, c, k=1)
            if regulated:
                params += _conv_bn(c, c, k=1)
            cin = c
    return params + _fc(WIDTHS[-1]), same


def _free(template: tuple[int, Counter]) -> tuple[int, int]:
    return template[0], template[0]


def _mixed(template: tuple[int, Counter]) -> tuple[int, int]:
    """A mixed DACNN (paper section 3, Table 3): its free twin is the template; one C x C 3x3 kernel per
    width takes the place of the template's C x C 3x3 convs, so n uses save (n - 1) x 9C^2."""
    per_use, same = template
    return per_use - sum((n - 1) * 9 * c * c for c, n in same.items()), per_use


# (unique, per_use) at the registered defaults, each derived from the architecture
EXPECTED = {
    "dacnn": _plain_counts(14, 128, CLASSES),  # the builder's defaults are DACNN-14's
    "dacnn14": _plain_counts(14, 128, CLASSES),
    "dacnn18": _plain_counts(18, 128, CLASSES),
    "dacnn34": _plain_counts(34, 128, CLASSES),
    "dacnn18_reg": _plain_counts(18, 128, CLASSES, REGULATED_BLOCKS[18]),
    "dacnn24_reg": _plain_counts(24, 128, CLASSES, REGULATED_BLOCKS[24]),
    "dacnn34_reg": _plain_counts(34, 128, CLASSES, REGULATED_BLOCKS[34]),
    "dacnn14_mix": _mixed(_vgg16_1fc()),
    "dacnn18_mix": _mixed(_resnet(18)),
    "dacnn34_mix": _mixed(_resnet(34)),
    "dacnn18_mix_reg": _mixed(_resnet(18, regulated=True)),
    "dacnn34_mix_reg": _mixed(_resnet(34, regulated=True)),
    "resnet18": _free(_resnet(18)),
    "resnet34": _free(_resnet(34)),
    "vgg16_1fc": _free(_vgg16_1fc()),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_follow_the_architecture(name: str) -> None:
    counts = count_params(create_model(name))
    assert (counts.unique, counts.per_use) == EXPECTED[name]
    assert counts.unique == sum(p.numel() for p in create_model(name).parameters())


def test_every_model_of_these_families_has_a_formula() -> None:
    ours = {n for n in list_models() if model_info(n).family in FAMILIES}
    assert ours == set(EXPECTED)


@pytest.mark.parametrize("depth", [3, 5, 7, 9, 11, 14, 18, 24, 34])
@pytest.mark.parametrize(("width", "classes"), [(128, 100), (16, 10)])
def test_dacnn_closed_form(depth: int, width: int, classes: int) -> None:
    model = create_model("dacnn", depth=depth, width=width, num_classes=classes)
    counts = count_params(model)
    assert (counts.unique, counts.per_use) == _plain_counts(depth, width, classes)
    free = count_params(create_model("dacnn", depth=depth, width=width, num_classes=classes, shared=False))
    assert free.unique == free.per_use == counts.per_use
    assert [s.uses for s in counts.shared] == ([depth - 2] if depth > 3 else [])


@pytest.mark.parametrize("depth", sorted(REGULATED_BLOCKS))
def test_regulated_dacnn_closed_form(depth: int) -> None:
    counts = count_params(create_model(f"dacnn{depth}_reg"))
    assert (counts.unique, counts.per_use) == _plain_counts(depth, 128, 100, REGULATED_BLOCKS[depth])


def test_dacnn_without_batchnorm_has_conv_biases() -> None:
    """Table 1's ablation: no BN, so every conv keeps a bias (the shared kernel's bias is shared)."""
    c, k = 128, 100
    for depth in (14, 18):
        counts = count_params(create_model("dacnn", depth=depth, batchnorm=False))
        assert counts.unique == 27 * c + c + 9 * c * c + c + c * k + k
        assert counts.per_use == 27 * c + c + (depth - 2) * (9 * c * c + c) + c * k + k


@pytest.mark.parametrize("name", DACNN_MODELS)
def test_per_use_equals_free_twin(name: str) -> None:
    """per_use of a shared DACNN = unique of the same builder with ``shared=False``."""
    counts = count_params(create_model(name))
    free = count_params(create_model(name, shared=False))
    assert free.shared == [] and free.unique == free.per_use == counts.per_use


@pytest.mark.parametrize("name", [n for n in list_models() if model_info(n).shared_twin])
def test_per_use_equals_registered_twin(name: str) -> None:
    twin = model_info(name).shared_twin
    assert count_params(create_model(name)).per_use == count_params(create_model(twin)).unique


@pytest.mark.parametrize("name", DACNN_MODELS)
def test_static_count_equals_dynamic(name: str) -> None:
    """Uses seen statically (AnchoredConv2d) = module calls during a forward pass."""
    model = create_model(name, width=4 if "mix" in name else 8)
    x = torch.randn(1, *model.info.input_size)
    static, dynamic = count_params(model), count_params(model, example_input=x)
    assert static == dynamic
    assert static.shared and all(s.uses > 1 for s in static.shared)


def _plain_flops(depth: int, width: int, classes: int, size: int = 32) -> int:
    """Forward FLOPs of a plain DACNN: 2 per multiply-add, every conv use at its resolution."""
    flops, cin = 0, 3
    for group in split_evenly(depth - 1, min(5, depth - 1)):
        for _ in range(group):
            flops += 2 * 9 * cin * width * size * size
            cin = width
        size //= 2
    return flops + 2 * width * classes


@pytest.mark.parametrize("depth", [3, 5, 9, 14])
def test_flops_count_every_use(depth: int) -> None:
    model = create_model("dacnn", depth=depth, width=16, num_classes=10)
    assert count_flops(model) == _plain_flops(depth, 16, 10)


def test_flops_grow_with_depth_params_do_not() -> None:
    depths = (5, 9, 14, 18, 34)
    models = [create_model("dacnn", depth=d, width=16) for d in depths]
    flops = [count_flops(m) for m in models]
    uniques = [count_params(m).unique for m in models]
    assert flops == sorted(flops) and len(set(flops)) == len(flops)
    # only the per-layer BatchNorm (2 x width per use) grows with depth
    assert [u - uniques[0] for u in uniques] == [2 * 16 * (d - depths[0]) for d in depths]


@pytest.mark.parametrize("name", ["dacnn14", "dacnn18_reg", "dacnn18_mix"])
def test_shared_and_free_twin_cost_the_same_flops(name: str) -> None:
    width = 4 if "mix" in name else 16
    shared = count_flops(create_model(name, width=width))
    assert shared == count_flops(create_model(name, width=width, shared=False))


def test_count_params_sees_parameter_aliasing_and_shared_parents() -> None:
    """The two other sharing mechanisms of SPEC.md: one Parameter under several modules, and one
    module registered under several parents."""
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight  # aliasing (kernel-sharing reference code)
    counts = count_params(nn.Sequential(a, b))
    assert counts.unique == 16 + 4 + 4 and counts.per_use == 16 * 2 + 4 + 4
    assert [(s.numel, s.uses) for s in counts.shared] == [(16, 2)]

    conv = nn.Conv2d(2, 2, 3, bias=False)
    model = nn.Sequential(nn.Sequential(conv), nn.Sequential(conv), nn.Sequential(conv))
    counts = count_params(model)
    assert (counts.unique, counts.per_use) == (36, 108)


def test_flops_count_the_defined_network_not_an_inference_rewrite() -> None:
    """LruNet's eval path folds BN and merges convs (more FLOPs, fewer ops); count_flops must count
    the network the paper defines (14-LruNet-1x: 71.0 MFLOP per 32x32 image,
    docs/reference/PERFORMANCE.md) in either mode, and leave the model's state alone."""
    model = create_model("lrunet_1x", layer_reuse=14).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_flops(model) == 70_995_968
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert count_flops(model.train()) == 70_995_968 and model.training


# ---------------------------------------------------------------- users' counters: thop, fvcore
def _tied_and_free(name: str):
    model = small_model(name).eval()
    free = copy.deepcopy(model)
    untie(free)
    return model, free, small_input(model)


@pytest.mark.parametrize("name", shared_model_names())
def test_thop_with_the_rule_counts_unique_parameters_and_every_use(name: str) -> None:
    """``dacnn.counting.thop_custom_ops()``: thop's MACs of the tied model are its free twin's (one
    ``nn.Conv2d`` per use, which thop knows), its parameters the unique count."""
    thop = pytest.importorskip("thop", reason="thop is not installed (pip install 'dacnn[count]')")

    model, free, x = _tied_and_free(name)
    rules = thop_custom_ops()
    macs, params = thop.profile(copy.deepcopy(model), inputs=(x,), custom_ops=rules, verbose=False)
    free_macs, _ = thop.profile(free, inputs=(x,), verbose=False)
    assert macs == free_macs and params == count_params(model).unique
    plain_macs, _ = thop.profile(copy.deepcopy(model), inputs=(x,), verbose=False)
    assert plain_macs < macs  # what thop says without the rule


@pytest.mark.parametrize("name", shared_model_names())
def test_fvcore_books_each_use_where_it_is_applied(name: str) -> None:
    """``dacnn.counting.fvcore_flops``: per module, the tied model's FLOPs are its free twin's (same
    names: ``untie`` puts a conv in each use's place), and a kernel's owner books none."""
    fvcore_nn = pytest.importorskip("fvcore.nn", reason="fvcore is not installed (dacnn[count])")

    model, free, x = _tied_and_free(name)
    tied = fvcore_flops(model, (x,))
    twin = fvcore_nn.FlopCountAnalysis(free, (x,))
    for analysis in (tied, twin):
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    assert tied.total() == twin.total()
    by_use, by_free = tied.by_module(), twin.by_module()
    assert {k: by_use[k] for k in by_free} == dict(by_free)
    assert all(by_use[n] == 0 for n, m in model.named_modules() if isinstance(m, SharedKernel))
    assert fvcore_nn.parameter_count(model)[""] == count_params(model).unique


def test_forward_calls_follow_the_call_order_and_restore_the_mode() -> None:
    """A shared kernel used three times appears three times, in order; mode and hooks restored."""
    kernel = nn.Linear(4, 4)
    model = nn.Sequential(kernel, nn.ReLU(), kernel, nn.BatchNorm1d(4), kernel)
    model.train()
    calls = forward_calls(model, torch.randn(2, 4), lambda m: isinstance(m, (nn.Linear, nn.BatchNorm1d)))
    assert [name for name, _ in calls] == ["0", "0", "3", "0"]
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert model[3].num_batches_tracked.item() == 0
