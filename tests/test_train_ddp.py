"""DistributedDataParallel on CPU (gloo, :mod:`dacnn.train.distributed`): two processes give the
gradients of one, only rank 0 writes, and the train metrics do not depend on the number of processes
or hosts.

Without BatchNorm every sample's loss is independent of the batch split, and DDP averages the
shard gradients into the full-batch gradient: 1 process, 2 processes and 2 "hosts" (two network
namespaces joined by a veth pair, ``torchrun --nnodes 2``) follow the same trajectory, so they
report the same train loss and accuracy (a world-size bug counted ``world**2`` times the images).
Data: the project's synthetic Fashion-MNIST in the official IDX format (no ``../shared`` needed).
"""

from __future__ import annotations

import json
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

from _helpers import synthetic_fashion_mnist
from dacnn import create_model
from dacnn.train.distributed import DistContext, cleanup, has_unused_parameters, shard_batch, wrap_ddp
from dacnn.train.engine import StepRunner

SRC = str(Path(__file__).resolve().parents[1] / "src")
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
IP = shutil.which("ip")


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


@pytest.mark.integration
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


@pytest.mark.integration
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


# ---- train metrics: 1 process, 2 processes, 2 hosts -----------------------------------------------
def _env(data: Path) -> dict[str, str]:
    return {**os.environ, "DACNN_DATA": str(data), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _args(out: Path, name: str) -> list[str]:
    return ["-m", "dacnn", "train", "--model", "dacnn", "--depth", "4", "--width", "8",
            "--model-kwargs", "batchnorm=false", "--dataset", "fashion_mnist", "--val-size", "0",
            "--batch-size", "32", "--epochs", "1", "--lr", "0.05", "--no-eval-test", "--threads", "1",
            "--seed", "3", "--out-dir", str(out), "--run-name", name]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_fashion_mnist(tmp_path_factory.mktemp("data"), 160)


def _record(run: Path) -> dict:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("runs1")
    result = subprocess.run([sys.executable, *_args(out, "one")], env=_env(data), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return _record(out / "one")


def _assert_same_metrics(got: dict, want: dict) -> None:
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-3)
    assert abs(got["train_acc"] - want["train_acc"]) <= 100.0 / 160 + 1e-9  # one image at most


@pytest.mark.integration
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_two_processes_report_the_single_process_train_metrics(data, single, tmp_path):
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", *_args(tmp_path, "two")]
    result = subprocess.run(cmd, env=_env(data), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout
    _assert_same_metrics(_record(tmp_path / "two"), single)


def _netns_reason() -> str | None:
    if TORCHRUN is None:
        return "torchrun is not installed beside this Python"
    if IP is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"dacnn-probe-{os.getpid()}"
    made = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    subprocess.run([IP, "netns", "del", probe], capture_output=True)
    return None


def _sh(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Two network namespaces ``(name, interface, address)`` joined by a veth pair."""
    reason = _netns_reason()
    if reason:
        pytest.skip(reason)
    tag = os.getpid() % 100000
    hosts = [(f"dacnn-a{tag}", f"va{tag}", "10.213.0.1"), (f"dacnn-b{tag}", f"vb{tag}", "10.213.0.2")]
    try:
        for ns, _, _ in hosts:
            _sh("netns", "add", ns)
        (a, va, _), (b, vb, _) = hosts
        _sh("link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
        for ns, dev, addr in hosts:
            _sh("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _sh("-n", ns, "link", "set", dev, "up")
            _sh("-n", ns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for ns, _, _ in hosts:
            subprocess.run([IP, "netns", "del", ns], capture_output=True)


@pytest.mark.integration
def test_two_hosts_over_a_veth_pair_report_the_single_process_train_metrics(data, single, tmp_path,
                                                                              two_hosts):
    master = two_hosts[0][2]
    procs = []
    for node_rank, (ns, dev, _) in enumerate(two_hosts):
        cmd = [IP, "netns", "exec", ns, TORCHRUN, "--nnodes", "2", "--node-rank", str(node_rank),
               "--nproc-per-node", "1", "--master-addr", master, "--master-port", "29513",
               *_args(tmp_path, "hosts")]
        env = {**_env(data), "GLOO_SOCKET_IFNAME": dev}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=300))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    assert "2 processes" in outputs[0][0]
    assert [p.name for p in tmp_path.iterdir()] == ["hosts"]  # node 0's rank 0 alone wrote
    _assert_same_metrics(_record(tmp_path / "hosts"), single)
