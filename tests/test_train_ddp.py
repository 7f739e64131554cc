"""DistributedDataParallel on CPU (gloo): two processes give the gradients of one, only rank 0 writes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dacnn import create_model
from dacnn.train.distributed import DistContext, cleanup, has_unused_parameters, shard_batch, wrap_ddp
from dacnn.train.engine import StepRunner


class _WithDeadWeight(nn.Module):
    """A shared-kernel DACNN without BatchNorm (per-sample maths, so a split batch gives the same
    gradients) plus a registered parameter forward never uses (DACNN release code's habit)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = create_model("dacnn", depth=4, width=8, num_classes=10, batchnorm=False)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)


def _gradients(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    wrapped = wrap_ddp(model, ctx, torch.device("cpu"), (3, 32, 32))
    runner = StepRunner(wrapped, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"))
    x, y = shard_batch(*_batch(), ctx)
    runner.forward_backward(x, y)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ctx, clean_exit = DistContext(rank=rank, world=world), False
    try:
        torch.manual_seed(0)
        grads = _gradients(_WithDeadWeight(), ctx)
        torch.save(grads, os.path.join(out_dir, f"grads{rank}.pt"))
        clean_exit = True
    finally:
        cleanup(ctx, clean_exit=clean_exit)  # the library's teardown, as train() uses it


def test_two_gloo_processes_give_the_single_process_gradients(tmp_path):
    torch.manual_seed(0)
    model = _WithDeadWeight()
    assert has_unused_parameters(model, (3, 32, 32))
    expected = _gradients(model, DistContext())
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        assert got.keys() == expected.keys()  # the dead weight has no gradient anywhere
        assert "net.kernels.anchor.weight" in got
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


def test_shard_batch_takes_interleaved_slices():
    x, y = torch.arange(10).view(10, 1), torch.arange(10)
    parts = [shard_batch(x, y, DistContext(rank=r, world=3)) for r in range(3)]
    assert [p[1].tolist() for p in parts] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_torchrun_two_processes_train_and_only_rank0_writes(fashion_mnist_root, tmp_path):
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "DACNN_DATA": fashion_mnist_root, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "dacnn", "train", "--model", "dacnn",
           "--depth", "4", "--width", "8", "--dataset", "fashion_mnist", "--train-subset", "256",
           "--val-size", "128", "--batch-size", "64", "--epochs", "1", "--no-eval-test",
           "--out-dir", str(tmp_path), "--run-name", "ddp"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # one run directory, written by rank 0
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 1
