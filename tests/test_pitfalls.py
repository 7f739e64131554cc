"""Tied weights stay tied everywhere: the pitfalls of ``docs/reference/PITFALLS.md`` (B, C), one test each.

Where a pitfall applies to both kinds of sharing the test runs on a ``native`` shared model (a 16-way
shared ConvMixer) and on a ``plugin`` one (a small ResNet-style net, one BatchNorm per use, tied by
:func:`dacnn.share_kernels`). Design under test: a shared tensor is owned by one
:class:`~dacnn.shared_kernel.SharedKernel`; its uses (:class:`~dacnn.shared_kernel.AnchoredConv2d`)
point at the owning *module*, so whatever tensor the owner holds is what every use applies, whichever
way it got there (copy, assign, to_empty, deepcopy). Safetensors (B.3) is tested on every registered
model in ``test_shared_kernel.py``.
"""

from __future__ import annotations

import copy
import io
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse

from dacnn import count_flops, count_params, share_kernels, untie
from dacnn.models.convmixer import ConvMixer
from dacnn.models.lrunet import LruNet
from dacnn.models.se_resnet import SEResNet
from dacnn.shared_kernel import AnchoredConv2d, SharedKernel, anchored_uses
from dacnn.train.ema import ModelEMA
from dacnn.train.optim import param_groups


def _with_bn_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and scales, then eval mode."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
    return model.eval()


# ---- the plug-in case: a small ResNet-style net tied by share_kernels ---------------------------------
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
    original = _with_bn_statistics(Net())
    shared = copy.deepcopy(original)
    report = share_kernels(shared, example_input=X)
    assert [len(g.uses) for g in report.groups] == [4, 4]
    return original.eval(), shared.eval()


def _small_mixer() -> ConvMixer:
    """16-way shared ConvMixer (as PITFALLS B.4), small width for speed."""
    torch.manual_seed(0)
    return ConvMixer(16, 16, kernel_size=3, shared=True, num_classes=10)


@dataclass(frozen=True)
class Case:
    """A tied model: how to build it, a copy on the meta device, an input, and what it must hold."""

    build: Callable[[], nn.Module]
    meta: Callable[[], nn.Module]
    x: torch.Tensor
    kernel: str  # the shared kernel the tests watch
    kernel_uses: int
    kernels: int  # SharedKernel modules in all
    uses: int  # AnchoredConv2d modules in all


def _mixer_on_meta() -> nn.Module:
    with torch.device("meta"):
        return ConvMixer(16, 16, kernel_size=3, shared=True)


CASES = {
    "native": Case(lambda: _small_mixer().eval(), _mixer_on_meta, torch.randn(2, 3, 8, 8),
                   "kernels.depthwise", 16, 2, 32),
    "plugin": Case(lambda: _pair()[1], lambda: copy.deepcopy(_pair()[1]).to("meta"), X,
                   "layer1.0.conv1.kernel", 4, 2, 8),
}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


def _fresh(case: Case) -> nn.Module:
    """The case's model with every parameter zeroed: a load must bring every value back."""
    model = case.build()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def _assert_tied(model: nn.Module, case: Case) -> None:
    """Every use applies a kernel the model owns, each tensor is registered once, and moving the
    owner's tensor moves every use."""
    kernels = [m for m in model.modules() if isinstance(m, SharedKernel)]
    uses = [m for m in model.modules() if isinstance(m, AnchoredConv2d)]
    assert (len(kernels), len(uses)) == (case.kernels, case.uses)
    assert uses and all(any(u.kernel is k for k in kernels) for u in uses)
    ids = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    assert len(ids) == len(set(ids)), "a tensor is registered under two names"
    xs = [torch.randn(1, u.in_channels, 5, 5) for u in uses]
    with torch.no_grad():
        before = [u(x) for u, x in zip(uses, xs)]
        for k in kernels:
            k.weight.add_(1.0)
        after = [u(x) for u, x in zip(uses, xs)]
        for k in kernels:
            k.weight.sub_(1.0)
    assert all(not torch.allclose(a, b) for a, b in zip(after, before))


def _same_output(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


# ---- B.1 counting, B.13 BatchNorm per use (plug-in) --------------------------------------------------
def test_counts_and_one_batchnorm_per_use() -> None:
    original, shared = _pair()
    counts = count_params(shared)
    assert counts.per_use == count_params(original).unique == sum(p.numel() for p in original.parameters())
    assert counts.unique == counts.per_use - 3 * 8 * 8 * 9 - 3 * 16 * 16 * 9
    assert sorted((s.shape, s.uses) for s in counts.shared) == [((8, 8, 3, 3), 4), ((16, 16, 3, 3), 4)]
    bns = [n for n, m in shared.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns == [n for n, m in original.named_modules() if isinstance(m, nn.BatchNorm2d)] and len(bns) == 8


# ---- B.2 state_dict ---------------------------------------------------------------------------------
def test_state_dict_has_one_key_per_tensor_and_a_copy_load_keeps_tying(case: Case) -> None:
    model = case.build()
    state = model.state_dict()
    kernel_keys = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, SharedKernel)]
    assert len(kernel_keys) == case.kernels and all(k in state for k in kernel_keys)
    assert len(state) == len(set(map(id, state.values())))  # no aliased keys whose values could disagree
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fresh = _fresh(case)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert count_params(fresh).unique == count_params(model).unique
    kernel = case.kernel
    torch.testing.assert_close(fresh.get_submodule(kernel).weight, model.get_submodule(kernel).weight)
    _same_output(fresh, model, case.x)
    _assert_tied(fresh, case)  # last: its +1/-1 round trip on the kernels may round them


def test_load_state_dict_assign_keeps_tying(case: Case) -> None:
    model = case.build()
    fresh = _fresh(case)
    fresh.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert count_params(fresh).unique == count_params(model).unique  # not 16x larger (B.2)
    for name, kernel in fresh.named_modules():
        if isinstance(kernel, SharedKernel):
            assert kernel.weight is not model.get_submodule(name).weight
            users = [m for m in fresh.modules() if isinstance(m, AnchoredConv2d) and m.kernel is kernel]
            assert users and all(m.kernel.weight is kernel.weight for m in users)
    _same_output(fresh, model, case.x)
    new_weight = fresh.get_submodule(case.kernel).weight
    fresh.train()(case.x).sum().backward()
    assert new_weight.grad is not None and new_weight.grad.abs().sum() > 0
    _assert_tied(fresh, case)  # last: its +1/-1 round trip on the kernels may round them


# ---- B.4 EMA, B.9 optimizer groups ------------------------------------------------------------------
def test_ema_moves_a_shared_kernel_once_per_step(case: Case) -> None:
    model = case.build()
    ema = ModelEMA(model, decay=0.9)
    start = ema.module.get_submodule(case.kernel).weight.clone()
    with torch.no_grad():
        model.get_submodule(case.kernel).weight.add_(1.0)
    ema.update(model)
    moved = (ema.module.get_submodule(case.kernel).weight - start).mean().item()
    assert moved == pytest.approx(0.1, abs=1e-6)  # not 1 - 0.9**uses (0.81 for 16 uses)
    assert sum(p.numel() for p in ema.module.parameters()) == count_params(model).unique


@pytest.mark.parametrize("decay_1d", [False, True])
def test_optimizer_groups_hold_each_tensor_once(case: Case, decay_1d: bool) -> None:
    model = case.build()
    groups = param_groups(model, weight_decay=0.01, decay_1d=decay_1d)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    torch.optim.AdamW(groups, lr=1e-3)  # raises on duplicates
    kernel = model.get_submodule(case.kernel)
    decayed = {id(p) for p in groups[0]["params"]}
    assert id(kernel.weight) in decayed
    if kernel.bias is not None:
        assert (id(kernel.bias) in decayed) == decay_1d
    # even a naive walk over modules meets the kernel once: it has a single owner
    walked = [id(p) for m in model.modules() for p in m.parameters(recurse=False)]
    assert len(walked) == len(set(walked))


# ---- B.5 conv-BN folding ------------------------------------------------------------------------------
FOLD_CASES = {
    "native-se_resnet": (lambda: SEResNet(2, share_stages=True), torch.randn(2, 3, 32, 32)),
    "native-lrunet_4": (lambda: LruNet(4, 1), torch.randn(2, 3, 32, 32)),
    "plugin": (lambda: _pair()[1], X),
}


@pytest.mark.parametrize("key", sorted(FOLD_CASES))
def test_fx_fuse_leaves_shared_models_intact_and_folds_after_untie(key: str) -> None:
    build, x = FOLD_CASES[key]
    torch.manual_seed(0)
    model = _with_bn_statistics(build())
    tol = {"rtol": 1e-4, "atol": 1e-5 if key == "plugin" else 1e-4}
    with torch.no_grad():
        expected = model(x)
        fused = fuse(model)  # AnchoredConv2d is not nn.Conv2d: its per-use BNs are not folded into it
        torch.testing.assert_close(fused(x), expected, **tol)
        untied = copy.deepcopy(model)
        untie(untied)
        bns_before = sum(isinstance(m, nn.BatchNorm2d) for m in untied.modules())
        folded = fuse(untied)
        bns_after = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(x), expected, **tol)
    if key == "native-se_resnet":
        assert bns_after < bns_before - 6  # the untied per-use convs were folded this time
    if key == "plugin":
        assert bns_after == 0
    assert count_params(model).unique == count_params(build()).unique


# ---- B.8 to_empty, deepcopy -------------------------------------------------------------------------
def test_meta_device_then_to_empty_keeps_tying(case: Case) -> None:
    meta = case.meta()
    assert meta.get_submodule(case.kernel).weight.is_meta
    model = meta.to_empty(device="cpu")
    reference = case.build()
    model.load_state_dict(reference.state_dict())
    assert count_params(model).unique == count_params(reference).unique  # not 1,409,034-style
    weight = model.get_submodule(case.kernel).weight
    users = [m for m in model.modules() if isinstance(m, AnchoredConv2d) and m.kernel.weight is weight]
    assert len(users) == case.kernel_uses
    _assert_tied(model, case)


def test_deepcopy_keeps_tying_to_the_copy(case: Case) -> None:
    model = case.build()
    clone = copy.deepcopy(model)
    kernels = [m for m in clone.modules() if isinstance(m, SharedKernel)]
    uses = [m for m in clone.modules() if isinstance(m, AnchoredConv2d)]
    assert all(any(u.kernel is k for k in kernels) for u in uses)
    assert anchored_uses(clone)[id(clone.get_submodule(case.kernel))] == case.kernel_uses
    _assert_tied(clone, case)


# ---- B.10 ONNX ---------------------------------------------------------------------------------------
def test_onnx_stores_each_kernel_once(case: Case, tmp_path) -> None:  # noqa: ANN001
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = case.build()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (case.x,), str(path), dynamo=False, input_names=["x"], do_constant_folding=False)
    graph = onnx.load(str(path)).graph
    unique = len(list(model.parameters())) + len([b for b in model.buffers() if b.is_floating_point()])
    assert len(graph.initializer) <= unique
    for kernel in (m for m in model.modules() if isinstance(m, SharedKernel)):
        shape = tuple(kernel.weight.shape)
        assert len([i for i in graph.initializer if tuple(i.dims) == shape]) == 1, shape
    out = ort.InferenceSession(str(path)).run(None, {"x": case.x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(case.x), rtol=1e-4, atol=1e-4)


# ---- B.12 FLOPs per use (plug-in) ---------------------------------------------------------------------
def test_flops_count_every_use() -> None:
    original, shared = _pair()
    assert count_flops(shared, (3, 16, 16)) == count_flops(original, (3, 16, 16)) > 0


# ---- B.6 DDP (module reuse + our autograd Function) ------------------------------------------------
def _ddp_worker(rank: int, port: int, state: dict, batch: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = LruNet(2, 1, drop_rate=0.0)
    model.load_state_dict(state)
    ddp = nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False: none may be unused
    ddp(batch[rank * 2:(rank + 1) * 2]).sum().backward()
    out[rank] = {n: p.grad.clone() for n, p in model.named_parameters()}
    dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.slow  # spawns two interpreters; DDP on a shared DACNN is in test_train_ddp.py's default run
def test_ddp_two_gloo_processes_average_lrunet_gradients() -> None:
    torch.manual_seed(0)
    model = LruNet(2, 1, drop_rate=0.0)
    batch = torch.randn(4, 3, 32, 32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_ddp_worker, args=(port, model.state_dict(), batch, out), nprocs=2, join=True)
    local = []
    for rank in range(2):  # what each rank computes alone; DDP must give their mean on both
        replica = copy.deepcopy(model)
        replica(batch[rank * 2:(rank + 1) * 2]).sum().backward()
        local.append({n: p.grad for n, p in replica.named_parameters()})
    for name in local[0]:
        mean = (local[0][name] + local[1][name]) / 2
        torch.testing.assert_close(out[0][name], out[1][name])
        torch.testing.assert_close(out[0][name], mean, rtol=1e-4, atol=1e-5 * (1 + mean.abs().max().item()))


# ---- B.11 torch.compile ---------------------------------------------------------------------------
@pytest.mark.slow
def test_torch_compile_keeps_tying_and_gradients() -> None:
    model = _small_mixer()
    compiled = torch.compile(model)
    x, w = torch.randn(4, 3, 8, 8), torch.randn(4, 10)
    (compiled(x) * w).sum().backward()
    compiled_grad = model.kernels.depthwise.weight.grad.clone()
    model.zero_grad()
    (model(x) * w).sum().backward()
    eager_grad = model.kernels.depthwise.weight.grad
    scale = eager_grad.abs().max().item()
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-3, atol=1e-4 * scale)
    assert count_params(model).unique == count_params(_small_mixer()).unique
