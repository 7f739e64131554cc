"""Kill-and-resume: a run SIGKILLed mid-epoch and resumed ends with bitwise the same weights.

The child process trains with ``--ckpt-every-steps 1``; a small wrapper installed in the child
stalls it right after the checkpoint of step ``KILL_AT`` is on disk (so the kill lands mid-epoch
every time, whatever the machine's speed), and the test sends a real SIGKILL. The resumed run must
continue from that checkpoint (batch 3 of epoch 2) and finish identical to an uninterrupted run:
weights, optimizer-driven BN statistics and the logged training losses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dacnn import checkpoint as ckpt

pytestmark = pytest.mark.integration  # every test here starts a process

STEPS_PER_EPOCH = 8  # 512 images / batch 64
KILL_AT = STEPS_PER_EPOCH + 3  # mid-epoch 2
ARGS = ["train", "--model", "dacnn", "--depth", "4", "--width", "8", "--dataset", "fashion_mnist",
        "--train-subset", "512", "--val-size", "128", "--batch-size", "64", "--epochs", "3",
        "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--flip", "--crop-padding", "2",
        "--deterministic", "--no-eval-test", "--ema", "0.9",
        "--ckpt-every-steps", "1", "--seed", "3", "--threads", "1"]

CHILD = """
import sys, time
import dacnn.train.loop as loop
original = loop._Run.save
def save(self, epoch, batches_done, step, running, **kw):
    original(self, epoch, batches_done, step, running, **kw)
    if step == {kill_at}:
        print("CHECKPOINTED", flush=True)
        time.sleep(300)
loop._Run.save = save
from dacnn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(data: str) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = src + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {**os.environ, "DACNN_DATA": data, "PYTHONPATH": path}


def _run(args: list[str], out: Path, name: str, data: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dacnn", *args, "--out-dir", str(out), "--run-name", name],
                          env=_env(data), capture_output=True, text=True, timeout=300)


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    pointer = ckpt.read_pointer(run / "checkpoints", "last")
    assert pointer["epoch"] == 2 and pointer["batches_done"] == STEPS_PER_EPOCH
    weights = load_file(run / "checkpoints" / pointer["weights"])
    ema = load_file(run / "checkpoints" / pointer["eval_weights"])
    return {**weights, **{f"ema.{k}": v for k, v in ema.items()}}


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(fashion_mnist_root, tmp_path):
    reference = _run(ARGS, tmp_path, "uninterrupted", fashion_mnist_root)
    assert reference.returncode == 0, reference.stderr

    child = subprocess.Popen([sys.executable, "-c", CHILD.format(kill_at=KILL_AT), *ARGS, "--out-dir",
                              str(tmp_path), "--run-name", "killed"],
                             env=_env(fashion_mnist_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 240
    try:
        for line in child.stdout:
            if "CHECKPOINTED" in line or time.monotonic() > deadline:
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    killed = tmp_path / "killed"
    pointer = ckpt.read_pointer(killed / "checkpoints", "last")
    assert (pointer["epoch"], pointer["batches_done"], pointer["global_step"]) == (1, 3, KILL_AT)
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 1 only

    resumed = _run(["train", "--resume", str(killed)], tmp_path, "unused", fashion_mnist_root)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout

    expected, got = _final_weights(tmp_path / "uninterrupted"), _final_weights(killed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    ref_metrics = _metrics(tmp_path / "uninterrupted")
    new_metrics = _metrics(killed)
    assert [m["epoch"] for m in new_metrics] == [0, 1, 2]
    for a, b in zip(ref_metrics, new_metrics):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[key] == b[key], (a["epoch"], key)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_of_a_missing_run_is_a_clear_error(fashion_mnist_root, tmp_path):
    result = _run(["train", "--resume", str(tmp_path / "no-such-run")], tmp_path, "x", fashion_mnist_root)
    assert result.returncode == 2
    assert "no run directory" in result.stderr and "Traceback" not in result.stderr
