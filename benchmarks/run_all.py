"""Run every benchmark in ``benchmarks/`` and write ``docs/performance.md`` from what they print.

    python benchmarks/run_all.py                  # every benchmark, its default settings (make bench)
    python benchmarks/run_all.py --quick          # each with --quick where it has one (minutes)
    python benchmarks/run_all.py --only inference,train_throughput --output /tmp/perf.md
    python benchmarks/run_all.py --only lrunet_speed   # re-run one; the other sections stay

Each ``benchmarks/<name>.py`` (this file excepted) runs in its own process; its output is copied
into the page verbatim, under a heading from its docstring and a line giving the date, commit,
machine, torch version, exact command and wall time, so every table says where it came from. The
page is generated: hand-written text survives only inside ``<!-- reading:NAME:begin -->`` ...
``<!-- reading:NAME:end -->`` blocks (``summary`` at the top, one per benchmark after its output).
A benchmark that fails or times out is shown as such and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dacnn.experiments.provenance import machine_description, tree_state  # noqa: E402
from dacnn.experiments.report import read_blocks  # noqa: E402

PLACEHOLDER = "_No reading written yet._\n"


def benchmark_scripts(directory: Path = ROOT / "benchmarks") -> list[Path]:
    return sorted(p for p in directory.glob("*.py")
                  if p.name != Path(__file__).name and not p.name.startswith("_"))


def title(script: Path) -> str:
    doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or script.stem
    return doc.strip().splitlines()[0].rstrip(".")


def command(script: Path, quick: bool, threads: int | None) -> list[str]:
    argv = [sys.executable, os.path.relpath(script, ROOT)]
    usage = subprocess.run(argv + ["--help"], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    if quick and "--quick" in usage:
        argv.append("--quick")
    if threads is not None and "--threads" in usage:
        argv += ["--threads", str(threads)]
    return argv


def run(argv: list[str], timeout: float) -> tuple[int, str, float]:
    tick = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "src")}
    shared = ROOT.parent / "shared" / "data"  # what `make bench` passes, for a run without make
    if "DACNN_DATA" not in env and shared.is_dir():
        env["DACNN_DATA"] = str(shared)
    try:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        rc, out = proc.returncode, proc.stdout + (f"\n[stderr]\n{proc.stderr}" if proc.returncode else "")
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc, out = 124, partial + f"\n[timed out after {timeout:.0f} s]"
    return rc, out.rstrip("\n"), time.monotonic() - tick


def provenance_line(argv: list[str], seconds: float) -> str:
    import torch

    state = tree_state()
    machine = machine_description()
    commit = state.commit + (" (uncommitted changes in src/)" if state.dirty else "")
    shown = ["python", *argv[1:]]
    return (f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · commit `{commit}` · {machine['cpu']}, "
            f"{machine['cores']} cores · torch {torch.__version__} · `{shlex.join(shown)}` · "
            f"{seconds:.0f} s")


SECTION = re.compile(r"^## [^\n]*?\(`(?:[^`\n]*/)?(\w+)\.py`\).*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)


def read_sections(path: Path) -> dict[str, str]:
    """The sections of an existing page, by benchmark name: heading, provenance, output, reading."""
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    return {m.group(1): m.group(0).rstrip("\n") + "\n" for m in SECTION.finditer(text)}


def block(name: str, blocks: dict[str, str]) -> list[str]:
    return [f"<!-- reading:{name}:begin -->", blocks.get(name, PLACEHOLDER).rstrip("\n"),
            f"<!-- reading:{name}:end -->", ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks that take it")
    parser.add_argument("--only", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark (default 3600)")
    parser.add_argument("--threads", type=int, help="pass --threads N to the benchmarks that take it")
    parser.add_argument("--benchmarks", type=Path, default=ROOT / "benchmarks", help=argparse.SUPPRESS)
    args = parser.parse_args()
    scripts = every_script = benchmark_scripts(args.benchmarks)
    if args.only:
        wanted = {n.strip().removesuffix(".py") for n in args.only.split(",") if n.strip()}
        unknown = wanted - {s.stem for s in scripts}
        if unknown:
            have = ", ".join(s.stem for s in scripts)
            parser.error(f"--only: no benchmark {sorted(unknown)} (have: {have})")
        scripts = [s for s in scripts if s.stem in wanted]
    blocks = read_blocks(args.output)
    kept = read_sections(args.output) if args.only else {}  # --only: the other sections stay as they were
    how = "python benchmarks/run_all.py" + (" --quick" if args.quick else "")
    lines = ["# Performance", "",
             f"Generated by `{how}` (`make bench`); edit only inside the `reading` blocks, which "
             "regeneration keeps. Each section is one benchmark's output, verbatim, with the date, commit, "
             "machine and command it came from. Timings are of a shared, noisy machine: compare the ratios "
             "a benchmark measures within one run.", ""]
    lines += block("summary", blocks)
    failed = []
    for script in every_script:
        if script not in scripts:
            if script.stem in kept:
                lines += [kept[script.stem]]
            continue
        argv = command(script, args.quick, args.threads)
        print(f"running {shlex.join(argv[1:])} ...", flush=True)
        rc, out, seconds = run(argv, args.timeout)
        status = "" if rc == 0 else f" — **failed (exit {rc})**"
        if rc:
            failed.append(script.stem)
        print(f"  exit {rc} in {seconds:.0f} s", flush=True)
        lines += [f"## {title(script)} (`{os.path.relpath(script, ROOT)}`){status}", "",
                  provenance_line(argv, seconds), "", "```text", out, "```", ""]
        lines += block(script.stem, blocks)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    print(f"wrote {args.output}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
