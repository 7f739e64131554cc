"""What only a GPU can check: shared kernels on CUDA compute what they compute on the CPU, a bf16 +
channels_last training run on CUDA saves one tensor per shared kernel and loads on the CPU.

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
                 "--amp", "bf16", "--channels-last", "--out-dir", str(tmp_path), "--run-name", "r"]) == 0
    ckpt = tmp_path / "r" / "checkpoints"
    model, meta = load_model_file(ckpt / read_pointer(ckpt, "best")["eval_weights"], device="cpu")
    assert meta["model"] == "dacnn14"
    shared = [m for m in model.modules() if isinstance(m, SharedKernel)]
    assert len(shared) == 1 and next(model.parameters()).device.type == "cpu"
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
