"""Concurrent runs, failed writes and recovery, end to end through ``dacnn train`` and ``dacnn eval``.

Data: the project's synthetic Fashion-MNIST in the official IDX format, so no ``../shared`` needed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from _helpers import read_only_command, synthetic_fashion_mnist
from dacnn import checkpoint as ckpt
from dacnn.cli import main
from dacnn.train import loop
from dacnn.train.rundir import RunLock, best_weights, create_run_dir

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_fashion_mnist(tmp_path_factory.mktemp("data"), 64)


def _train_args(data: Path, out: Path, name: str = "run", epochs: int = 2) -> list[str]:
    return ["train", "--model", "dacnn", "--depth", "4", "--width", "8", "--dataset", "fashion_mnist",
            "--data-dir", str(data), "--val-size", "0", "--batch-size", "32", "--epochs", str(epochs),
            "--threads", "1", "--out-dir", str(out), "--run-name", name]


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    """A run of 3 epochs trained to its end (result.json written)."""
    out = tmp_path_factory.mktemp("runs")
    assert main(_train_args(data, out, epochs=3)) == 0
    return out / "run"


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


# ---------------------------------------------------------------- concurrent runs


def test_run_directories_are_made_atomically_by_concurrent_callers(tmp_path):
    made: list[Path] = []
    barrier = threading.Barrier(8)

    def make() -> None:
        barrier.wait()
        made.append(create_run_dir(tmp_path, "same"))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["same"] + [f"same-{n}" for n in range(2, 9)])


@pytest.mark.integration
def test_two_runs_started_at_once_into_one_out_dir_both_finish(data, tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dacnn", *_train_args(data, tmp_path, "twin", epochs=1), "--no-eval-test"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twin", "twin-2"]
    for name in ("twin", "twin-2"):
        assert len((tmp_path / name / "metrics.jsonl").read_text().splitlines()) == 1
        assert ckpt.read_pointer(tmp_path / name / "checkpoints")["epoch"] == 0


def test_a_second_resume_of_a_run_in_use_is_refused(data, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    held = RunLock(run)  # another process training in it
    try:
        assert main(["train", "--resume", str(run), "--epochs", "4"]) == 2
    finally:
        held.release()
    err = capsys.readouterr().err
    assert "in use by another training process" in err and str(run) in err


# ---------------------------------------------------------------- failed writes


def test_a_full_disk_keeps_the_last_good_checkpoint_and_the_run_resumes(data, tmp_path, monkeypatch, capsys):
    real = ckpt.atomic_write

    def full_disk_on_epoch_1(path, write):
        if Path(path).name.startswith("e0001"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, write)

    monkeypatch.setattr(ckpt, "atomic_write", full_disk_on_epoch_1)
    assert main(_train_args(data, tmp_path, epochs=2)) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "e0001" in err and "Traceback" not in err
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert ckpt.read_pointer(ckpt_dir)["version"].startswith("e0000")
    assert not list(ckpt_dir.glob("e0001*")), "a failed save left files behind"
    monkeypatch.setattr(ckpt, "atomic_write", real)
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert ckpt.read_pointer(ckpt_dir)["version"].startswith("e0001")
    assert [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").open()] == [0, 1]



@pytest.mark.integration
def test_a_read_only_out_dir_is_reported_before_the_data_is_loaded(tmp_path):
    readonly = tmp_path / "ro"
    cmd = [sys.executable, "-m", "dacnn", *_train_args(tmp_path / "no-data-here", readonly)]
    result = subprocess.run(read_only_command(readonly, cmd), env={**os.environ, "PYTHONPATH": SRC},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "--out-dir" in result.stderr and str(readonly) in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- recovery


def test_the_two_newest_checkpoints_are_kept(finished):
    assert ckpt.list_versions(finished / "checkpoints")[:2] == ["e0002-s00000006", "e0001-s00000004"]
    assert len(ckpt.list_versions(finished / "checkpoints")) <= 3  # + the best, when older


def test_best_weights_names_the_best_checkpoints_eval_file(finished, tmp_path):
    pointer = ckpt.read_pointer(finished / "checkpoints", "best")
    assert best_weights(finished) == finished / "checkpoints" / pointer["eval_weights"]
    assert best_weights(finished).is_file() and best_weights(tmp_path) is None


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF  # in the tensor data: same size, valid header
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_corrupted_last_checkpoint_falls_back_to_the_previous_one(data, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    last = ckpt.read_pointer(run / "checkpoints")
    _flip_a_byte(run / "checkpoints" / last["weights"])
    assert main(["eval", "--checkpoint", str(run), "--which", "last", "--json", "--data-dir", str(data)]) == 0
    out, err = capsys.readouterr()
    assert "damaged" in err and "e0001-s00000004" in err
    assert json.loads(out)["weights"].endswith("e0001-s00000004.safetensors")
    assert main(["train", "--resume", str(run), "--epochs", "4", "--no-eval-test"]) == 0
    out = capsys.readouterr().out
    assert "newest intact checkpoint e0001-s00000004" in out
    assert "resuming" in out and "at epoch 3" in out
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").open()] == [0, 1, 2, 3]


def test_a_run_killed_before_its_first_checkpoint_says_start_again(tmp_path, capsys):
    run = create_run_dir(tmp_path, "early")
    (run / "config.yaml").write_text("model: dacnn\n")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "start the run again" in err and str(run) in err


def test_resuming_a_finished_run_says_so_and_does_not_evaluate_again(finished, tmp_path, capsys,
                                                                    monkeypatch):
    run = _copy(finished, tmp_path)
    before = (run / "result.json").read_text()
    monkeypatch.setattr(loop._Run, "build_model", lambda *a: pytest.fail("a finished run was set up again"))
    assert main(["train", "--resume", str(run)]) == 0
    assert "is finished" in capsys.readouterr().out
    assert (run / "result.json").read_text() == before


def test_resume_with_another_model_is_refused_before_any_work(finished, tmp_path, capsys, monkeypatch):
    run = _copy(finished, tmp_path)
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("training started"))
    assert main(["train", "--resume", str(run), "--model", "lrunet14"]) == 2
    err = capsys.readouterr().err
    assert "'dacnn' -> 'lrunet14'" in err and "cannot" in err


def test_a_diverged_epoch_is_not_kept_in_the_logs(data, tmp_path, monkeypatch, capsys):
    real = loop._Run.end_epoch

    def poison_epoch_1(self, epoch, *args):
        if epoch == 1:  # the loss stayed finite, the weights did not
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return real(self, epoch, *args)

    monkeypatch.setattr(loop._Run, "end_epoch", poison_epoch_1)
    assert main(_train_args(data, tmp_path, epochs=3)) == 2
    assert "no longer finite" in capsys.readouterr().err
    run = tmp_path / "run"
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").open()] == [0]
    assert len((run / "summary.csv").read_text().splitlines()) == 2  # header + epoch 0


def _pages(root: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) for p in root.rglob("*") if p.is_file()) + 8


@pytest.mark.integration
def test_a_real_full_disk_keeps_the_last_good_checkpoint(data, tmp_path):
    """A tmpfs that fills up at a later epoch's checkpoint (root: a mount namespace)."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None or subprocess.run([unshare, "-m", "true"]).returncode != 0:
        pytest.skip("needs root and mount namespaces to make a small filesystem")
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    sizing = tmp_path / "sizing"
    args = [*_train_args(data, sizing, epochs=1), "--no-eval-test"]
    subprocess.run([sys.executable, "-m", "dacnn", *args], env=env, check=True, capture_output=True)
    used = _pages(sizing / "run")  # after one epoch
    version = _pages(sizing / "run" / "checkpoints") - 8
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    train = " ".join([sys.executable, "-m", "dacnn", *_train_args(data, disk, epochs=3), "--no-eval-test"])
    script = (f"mount -t tmpfs -o size={(used + version // 2) * 4}k tmpfs {disk} && "
              f"{{ {train}; echo rc=$?; cp -a {disk}/run {kept}; }}")
    result = subprocess.run([unshare, "-m", "sh", "-c", script], env=env, capture_output=True, text=True,
                            timeout=300)
    assert "rc=2" in result.stdout, result.stdout + result.stderr[-3000:]
    assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
    pointer, _, note = ckpt.newest_valid(kept / "checkpoints", "last")
    assert note is None  # last.json names an intact version
    orphans = [p.name for p in (kept / "checkpoints").glob("e*")
               if p.name.split(".")[0].removesuffix("-ema") > pointer["version"]]
    assert not orphans, orphans
    assert main(["train", "--resume", str(kept), "--no-eval-test"]) == 0
    assert [json.loads(line)["epoch"] for line in (kept / "metrics.jsonl").open()] == [0, 1, 2]
