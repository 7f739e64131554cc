"""``benchmarks/run_all.py`` writes ``docs/performance.md`` from what the benchmarks print.

Two stand-in benchmarks (one prints a table, one fails) check the page's structure: every section
carries the date, commit, machine and command; a failure is shown and sets the exit status; the
hand-written reading blocks survive regeneration; ``--only`` keeps the other sections of the page.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # every test here starts a process

ROOT = Path(__file__).resolve().parents[1]


def run_all(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_run_all_writes_each_output_with_its_provenance(tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "speed.py").write_text('"""Speed of nothing."""\nimport sys\n'
                                    'print("| a | 1.00 |", "--quick" in sys.argv)\n'
                                    'if "--help" in sys.argv:\n    print("--quick")\n')
    (bench / "broken.py").write_text('"""Always fails."""\nimport sys\nif "--help" not in sys.argv:\n'
                                     '    sys.exit("boom")\n')
    out = tmp_path / "performance.md"
    proc = run_all("--benchmarks", str(bench), "--output", str(out), "--quick")
    assert proc.returncode == 1, proc.stderr  # broken.py failed
    text = out.read_text()
    assert "## Speed of nothing (" in text and "| a | 1.00 | True" in text  # --quick passed through
    assert "## Always fails (" in text and "**failed (exit 1)**" in text and "boom" in text
    provenance = [line for line in text.splitlines() if " UTC · commit `" in line]
    assert len(provenance) == 2
    for line in provenance:
        assert re.search(r"`[0-9a-f]{40}", line) and "torch " in line and "cores" in line
    edited = text.replace("_No reading written yet._\n<!-- reading:speed:end -->",
                          "Fast enough.\n<!-- reading:speed:end -->")
    out.write_text(edited)
    assert run_all("--benchmarks", str(bench), "--output", str(out), "--only", "speed").returncode == 0
    again = out.read_text()
    assert "Fast enough." in again
    assert again.count(" UTC · commit `") == 2  # --only speed: broken's section is kept as it was
    assert again.index("## Always fails (") < again.index("## Speed of nothing (")  # in script order
    assert "boom" in again
    fresh = tmp_path / "fresh.md"
    assert run_all("--benchmarks", str(bench), "--output", str(fresh), "--only", "speed").returncode == 0
    assert "Always fails" not in fresh.read_text()  # nothing to keep in a new page


def test_run_all_names_an_unknown_benchmark():
    proc = run_all("--only", "no_such_bench", "--output", "/dev/null")
    assert proc.returncode == 2 and "no_such_bench" in proc.stderr
