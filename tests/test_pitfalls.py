"""Tied weights stay tied everywhere: one test per pitfall of ``../shared/reference/PITFALLS.md`` (B, C).

Design under test: a shared tensor is owned by one :class:`~dacnn.shared_kernel.SharedKernel`; its uses
(:class:`~dacnn.shared_kernel.AnchoredConv2d`) point at the owning *module*, so whatever tensor the owner
holds is what every use applies, whichever way it got there (copy, assign, to_empty, deepcopy).
"""

from __future__ import annotations

import copy
import io
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_model, save_file, save_model
from torch import nn
from torch.fx.experimental.optimization import fuse

from dacnn import count_params, untie
from dacnn.models.convmixer import ConvMixer
from dacnn.models.lrunet import LruNet
from dacnn.models.se_resnet import SEResNet
from dacnn.shared_kernel import AnchoredConv2d, SharedKernel, anchored_uses
from dacnn.train.ema import ModelEMA
from dacnn.train.optim import param_groups


def _small_mixer() -> ConvMixer:
    """16-way shared ConvMixer (as PITFALLS B.4), small width for speed."""
    torch.manual_seed(0)
    return ConvMixer(16, 16, kernel_size=3, shared=True, num_classes=10)


def _assert_tied(model: nn.Module) -> None:
    """Every use applies a kernel the model owns, each tensor is registered once, and moving the
    owner's tensor moves every use."""
    kernels = [m for m in model.modules() if isinstance(m, SharedKernel)]
    uses = [m for m in model.modules() if isinstance(m, AnchoredConv2d)]
    assert uses and all(any(u.kernel is k for k in kernels) for u in uses)
    ids = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    assert len(ids) == len(set(ids)), "a tensor is registered under two names"
    x = torch.randn(1, uses[0].in_channels, 5, 5)
    with torch.no_grad():
        before = [u(x) for u in uses]
        for k in kernels:
            k.weight.add_(1.0)
        after = [u(x) for u in uses]
        for k in kernels:
            k.weight.sub_(1.0)
    assert all(not torch.allclose(a, b) for a, b in zip(after, before))


# ---- B.2 state_dict ---------------------------------------------------------------------------------
def test_state_dict_copy_load_keeps_tying() -> None:
    model = _small_mixer()
    assert len(model.state_dict()) == len(set(map(id, model.state_dict().values())))  # no alias keys
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = ConvMixer(16, 16, kernel_size=3, shared=True)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert count_params(fresh).unique == count_params(model).unique
    torch.testing.assert_close(fresh.kernels.depthwise.weight, model.kernels.depthwise.weight)
    _assert_tied(fresh)


def test_load_state_dict_assign_keeps_tying() -> None:
    model = _small_mixer()
    fresh = ConvMixer(16, 16, kernel_size=3, shared=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh.load_state_dict(state, assign=True)
    assert fresh.kernels.pointwise.weight is not model.kernels.pointwise.weight
    assert count_params(fresh).unique == count_params(model).unique  # not 16x larger (B.2)
    new_weight = fresh.kernels.pointwise.weight
    assert all(m.kernel.weight is new_weight for m in fresh.layers.modules()
               if isinstance(m, AnchoredConv2d) and m.kernel.kernel_size == (1, 1))
    fresh(torch.randn(2, 3, 8, 8)).sum().backward()
    assert new_weight.grad is not None and new_weight.grad.abs().sum() > 0
    _assert_tied(fresh)


def test_meta_device_then_to_empty_keeps_tying() -> None:
    with torch.device("meta"):
        meta = ConvMixer(16, 16, kernel_size=3, shared=True)
    assert meta.kernels.depthwise.weight.is_meta
    model = meta.to_empty(device="cpu")
    model.load_state_dict(_small_mixer().state_dict())
    assert count_params(model).unique == count_params(_small_mixer()).unique  # not 1,409,034-style
    dw = model.kernels.depthwise.weight
    assert all(m.kernel.weight is dw for m in model.modules()
               if isinstance(m, AnchoredConv2d) and m.kernel.groups == 16)
    _assert_tied(model)


def test_deepcopy_keeps_tying_to_the_copy() -> None:
    model = _small_mixer()
    clone = copy.deepcopy(model)
    uses = [m for m in clone.modules() if isinstance(m, AnchoredConv2d)]
    assert all(u.kernel in (clone.kernels.depthwise, clone.kernels.pointwise) for u in uses)
    assert anchored_uses(clone)[id(clone.kernels.depthwise)] == 16


# ---- B.3 safetensors ----------------------------------------------------------------------------------
def test_safetensors_round_trip_stores_each_shared_tensor_once(tmp_path) -> None:  # noqa: ANN001
    model = _small_mixer()
    save_model(model, str(tmp_path / "m.safetensors"))
    save_file(model.state_dict(), str(tmp_path / "plain.safetensors"))  # no aliases: save_file works too
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    unique = sum(p.numel() * p.element_size() for p in model.parameters())
    unique += sum(b.numel() * b.element_size() for b in model.buffers())
    assert stored == unique
    assert os.path.getsize(tmp_path / "m.safetensors") < stored + 64 * 1024  # header only on top
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        in_file = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    assert in_file == sum(t.numel() for t in model.state_dict().values())  # 16 uses, stored once
    fresh = ConvMixer(16, 16, kernel_size=3, shared=True)
    missing, unexpected = load_model(fresh, str(tmp_path / "m.safetensors"))
    assert not missing and not unexpected
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
    _assert_tied(fresh)


# ---- B.4 EMA, B.9 optimizer groups ------------------------------------------------------------------
def test_ema_moves_a_16_way_shared_kernel_once_per_step() -> None:
    model = _small_mixer()
    ema = ModelEMA(model, decay=0.9)
    start = ema.module.kernels.depthwise.weight.clone()
    with torch.no_grad():
        model.kernels.depthwise.weight.add_(1.0)
    ema.update(model)
    moved = (ema.module.kernels.depthwise.weight - start).mean().item()
    assert moved == pytest.approx(0.1, abs=1e-6)  # not 1 - 0.9**16 = 0.81
    assert sum(p.numel() for p in ema.module.parameters()) == count_params(model).unique


def test_optimizer_groups_hold_each_tensor_once() -> None:
    model = _small_mixer()
    groups = param_groups(model, weight_decay=0.01, decay_1d=False)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    torch.optim.AdamW(groups, lr=1e-3)  # raises on duplicates
    decayed = {id(p) for p in groups[0]["params"]}
    assert id(model.kernels.depthwise.weight) in decayed and id(model.kernels.depthwise.bias) not in decayed
    # even a naive walk over modules meets the kernel once: it has a single owner
    walked = [id(p) for m in model.modules() for p in m.parameters(recurse=False)]
    assert len(walked) == len(set(walked))


# ---- B.5 conv-BN folding ------------------------------------------------------------------------------
def _with_bn_statistics(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
    return model.eval()


@pytest.mark.parametrize("build", [lambda: SEResNet(2, share_stages=True), lambda: LruNet(4, 1)],
                         ids=["se_resnet", "lrunet_4"])
def test_fx_fuse_leaves_shared_models_intact_and_folds_after_untie(build) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = _with_bn_statistics(build())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        fused = fuse(model)  # AnchoredConv2d is not nn.Conv2d: its per-use BNs are not folded into it
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4)
        untied = copy.deepcopy(model)
        untie(untied)
        bns_before = sum(isinstance(m, nn.BatchNorm2d) for m in untied.modules())
        folded = fuse(untied)
        bns_after = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4)
    if isinstance(model, SEResNet):
        assert bns_after < bns_before - 6  # the untied per-use convs were folded this time
    assert count_params(model).unique == count_params(build()).unique


# ---- B.10 ONNX ---------------------------------------------------------------------------------------
def test_onnx_initializers_not_more_than_unique_tensors(tmp_path) -> None:  # noqa: ANN001
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = ConvMixer(16, 8, kernel_size=3, shared=True).eval()
    x = torch.randn(1, 3, 16, 16)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"])
    graph = onnx.load(str(path)).graph
    unique = len(list(model.parameters())) + len([b for b in model.buffers() if b.is_floating_point()])
    assert len(graph.initializer) <= unique
    kernel_inits = [i for i in graph.initializer if tuple(i.dims) == (16, 1, 3, 3)]
    assert len(kernel_inits) == 1  # the depthwise kernel, stored once for 8 uses
    out = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-4)


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
