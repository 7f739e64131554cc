"""``scripts/gpu-campaign --rehearse``: the GPU campaign's steps, on the CPU at smoke scale, end to end.

So the script is known to work before a GPU is ever lent: install (skipped), the CUDA tests (they
skip), the throughput benchmark, and two Table 7 rows whose records land under ``--out``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_rehearsal_runs_every_step_and_writes_records(tmp_path):
    from dacnn.data.synthetic import write_cifar

    data = tmp_path / "data"
    write_cifar(data / "cifar10", "cifar10", n_train=320, n_test=128)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DACNN_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(ROOT / "scripts" / "gpu-campaign"), "--rehearse", "--out", str(out),
            "--data-dir", str(data), "--runs-dir", str(tmp_path / "runs")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]][:2] == ["cuda-tests", "benchmark"]
    assert all(s["exit"] == 0 for s in summary["steps"])
    lines = (out / "results" / "smoke" / "table7.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["row"] for r in records] == ["c10-resnet18", "c10-resnet34"]
    for r in records:
        assert r["epochs"] == 1 and "--override epochs=1" in r["command"] and r["source_hash"]
    assert "done in" in (out / "gpu-campaign.log").read_text()
    assert (out / "benchmark.txt").read_text().strip()
