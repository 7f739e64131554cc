"""``scripts/gpu-campaign``: the route a lent GPU takes, rehearsed on the CPU at smoke scale, end to end.

As on the GPU: ``--prepare`` copies the shards into a ``gpu-data`` folder and pins the commit and
source hash; the run reads that folder (and nothing else: ``--data-dir`` is refused), installs
nothing, refuses a pin that does not match the tree before any device work, runs the CUDA tests
(they skip), measures the priority pair, plans it, trains both rows with a partial record after
every epoch and the full record at the end, then the one-model benchmark. The planner's decisions
are tested on a fake clock in ``tests/test_gpu_plan.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dacnn.experiments.provenance import dataset_checksum

pytestmark = pytest.mark.integration  # every test here starts a process

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-campaign"


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DACNN_CACHE": str(tmp / "cache"),
            "OMP_NUM_THREADS": "1"}


def _campaign(tmp: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=_env(tmp),
                          timeout=timeout)


@pytest.fixture
def prepared(tmp_path) -> Path:
    """``--prepare`` from a synthetic CIFAR-10 (``--allow-dirty``: the tree may be a working copy)."""
    from dacnn.data.synthetic import write_cifar

    write_cifar(tmp_path / "data" / "cifar10", "cifar10", n_train=320, n_test=128)
    gpu_data = tmp_path / "gpu-data"
    proc = _campaign(tmp_path, "--prepare", "--gpu-data", str(gpu_data), "--data-dir", str(tmp_path / "data"),
                     "--allow-dirty")
    assert proc.returncode == 0, proc.stderr
    assert 'carry=["gpu-data"]' in proc.stdout
    assert sorted(p.name for p in gpu_data.iterdir()) == ["cifar10", "provenance.json"]
    return gpu_data


def test_rehearsal_takes_the_gpu_route_and_writes_records(prepared, tmp_path):
    out = tmp_path / "out"
    proc = _campaign(tmp_path, "--rehearse", "--gpu-data", str(prepared), "--out", str(out),
                     "--runs-dir", str(tmp_path / "runs"), "--budget", "400")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = [s["step"] for s in summary["steps"]]
    assert steps == ["cuda-tests", "measure table7/c10-resnet18,table7/c10-mix18-reg",
                     "row table7/c10-resnet18", "row table7/c10-mix18-reg", "benchmark"]
    assert all(s["exit"] == 0 for s in summary["steps"])
    assert [p["row"] for p in summary["plan"]] == ["table7/c10-resnet18", "table7/c10-mix18-reg"]
    assert summary["pin"]["source_hash"] and summary["timings"]["table7/c10-resnet18"]["compile_s"] > 0
    store = out / "results" / "smoke"
    records = [json.loads(line) for line in (store / "table7.jsonl").read_text().splitlines()]
    checksum = dataset_checksum("cifar10", str(prepared))
    assert [r["row"] for r in records] == ["c10-resnet18", "c10-mix18-reg"]
    for r in records:
        assert r["epochs"] == 1 and "--override epochs=1" in r["command"] and r["source_hash"]
        assert "--record-every-epoch" in r["command"] and "scaled to the 1" in r["extra"]["note"]
        assert r["dataset_checksum"] == checksum  # read from the carried gpu-data
    assert [p.name for p in (store / "partial").iterdir()] == []  # superseded, and no lock file
    log = (out / "gpu-campaign.log").read_text()
    assert "partial record (1/1 epochs)" in log and "nothing installed" in log and "done in" in log
    assert "img/s" in log  # the benchmark's output streamed into the log


def test_a_stale_pin_is_refused_before_any_device_work(prepared, tmp_path):
    pin = json.loads((prepared / "provenance.json").read_text())
    (prepared / "provenance.json").write_text(json.dumps({**pin, "source_hash": "0123456789abcdef"}))
    out = tmp_path / "out"
    proc = _campaign(tmp_path, "--rehearse", "--gpu-data", str(prepared), "--out", str(out), timeout=120)
    assert proc.returncode == 2
    assert "refused:" in proc.stdout and "provenance.json pins commit" in proc.stdout
    assert "--prepare" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == [] and "refused" in summary


def test_without_prepared_data_or_with_data_dir_the_run_is_refused(tmp_path):
    proc = _campaign(tmp_path, "--rehearse", "--gpu-data", str(tmp_path / "none"),
                     "--out", str(tmp_path / "o"), timeout=120)
    assert proc.returncode == 2 and "--prepare" in proc.stdout
    proc = _campaign(tmp_path, "--rehearse", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                     timeout=120)
    assert proc.returncode == 2 and "--data-dir goes with --prepare" in proc.stderr
