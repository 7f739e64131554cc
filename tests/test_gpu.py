"""What only a GPU can check: shared kernels on CUDA compute what they compute on the CPU, a bf16 +
channels_last training run on CUDA saves one tensor per shared kernel and loads on the CPU, LruNet's
fast paths run on CUDA in fp32 and bf16 (its CPU-only fused op stays on the CPU), and
``--deterministic`` on CUDA warns instead of raising at AdaptiveAvgPool2d's backward.

Every test skips without CUDA (the default suite never needs a GPU); ``scripts/gpu-campaign`` runs
this file first on a lent GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from dacnn import SharedKernel, create_model
from dacnn.checkpoint import load_model_file, read_pointer
from dacnn.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 off, so fp32 on the GPU is comparable with the CPU to 1e-4."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("name", ["dacnn14", "dacnn18_mix_reg"])
def test_shared_kernel_forward_and_gradient_match_the_cpu(name):
    torch.manual_seed(0)
    cpu = create_model(name, width=16, num_classes=10).train()
    gpu = create_model(name, width=16, num_classes=10).train()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        torch.nn.functional.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
    kernels = [n for n, m in cpu.named_modules() if isinstance(m, SharedKernel)]
    assert kernels, f"{name} has no shared kernel"
    grads_cpu = {n: p.grad for n, p in cpu.named_parameters()}
    for n, p in gpu.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), grads_cpu[n], rtol=1e-3, atol=1e-4, msg=n)
    with torch.no_grad():
        cpu.eval(), gpu.eval()
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)


def test_bf16_channels_last_training_on_cuda_saves_one_tensor_per_shared_kernel(tmp_path):
    from dacnn.data.synthetic import write_cifar

    data = tmp_path / "data"
    write_cifar(data / "cifar10", "cifar10", n_train=256, n_test=64)
    assert main(["train", "--model", "dacnn14", "--width", "16", "--dataset", "cifar10", "--data-dir",
                 str(data), "--epochs", "1", "--batch-size", "64", "--val-size", "64", "--device", "cuda",
                 "--amp", "bf16", "--channels-last", "--no-compile",  # the campaign's rows compile
                 "--out-dir", str(tmp_path), "--run-name", "r"]) == 0
    ckpt = tmp_path / "r" / "checkpoints"
    model, meta = load_model_file(ckpt / read_pointer(ckpt, "best")["eval_weights"], device="cpu")
    assert meta["model"] == "dacnn14"
    shared = [m for m in model.modules() if isinstance(m, SharedKernel)]
    assert len(shared) == 1 and next(model.parameters()).device.type == "cpu"
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_lrunet_trains_and_evaluates_on_cuda(amp):
    from dacnn.train.engine import StepRunner, evaluate

    torch.manual_seed(0)
    cpu = create_model("lrunet_1x", num_classes=10)
    gpu = create_model("lrunet_1x", num_classes=10)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda().to(memory_format=torch.channels_last)
    device = torch.device("cuda")
    runner = StepRunner(gpu, torch.optim.SGD(gpu.parameters(), lr=0.01), device, amp=amp, channels_last=True)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss, _ = runner.step(x.cuda(), y.cuda())
    assert torch.isfinite(loss)
    result = evaluate(gpu, [(x.cuda(), y.cuda()), (x[:3].cuda(), y[:3].cuda())], device, amp=amp,
                      channels_last=True)
    assert result.n == 11
    if amp == "none":
        cpu.eval(), gpu.eval()
        with torch.no_grad():
            cpu.load_state_dict({k: v.cpu() for k, v in gpu.state_dict().items()})
            torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-3, atol=1e-4)


def test_deterministic_on_cuda_warns_at_adaptive_avg_pool_instead_of_raising():
    import warnings

    from dacnn.train.builders import set_deterministic

    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            set_deterministic(True, "cuda")
            model = create_model("resnet18", width=8, num_classes=10).cuda()
            model(torch.randn(4, 3, 32, 32, device="cuda")).sum().backward()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
