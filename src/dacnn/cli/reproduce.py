"""``dacnn reproduce`` (run a paper's table or figure at a scale) and ``dacnn report`` (rebuild the docs).

A thin layer over :mod:`dacnn.experiments`: specs live in ``src/dacnn/experiments/specs/``, results in
``results/`` (smoke scale: ``results/smoke/``), training runs in ``runs/reproduce/``.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

import yaml

from dacnn.errors import ConfigError
from dacnn.experiments.campaign import run_campaign
from dacnn.experiments.estimate import estimate_row
from dacnn.experiments.planning import RunOptions, plan
from dacnn.experiments.report import build_report
from dacnn.experiments.runner import reproduce, row_status
from dacnn.experiments.spec import SCALES, SPEC_DIR, get_spec, spec_names
from dacnn.experiments.store import ResultsStore
from dacnn.train.config import config_from_dict
from dacnn.train.runlog import format_duration
from dacnn.validation import option_type

EPILOG = """examples:
  dacnn reproduce --list                          # every spec and how many rows are done per scale
  dacnn reproduce table2 --list --scale cpu       # the rows of one spec and their status
  dacnn reproduce table2 --scale cpu --dry-run    # what would run, with config hashes
  dacnn reproduce table2 --scale cpu --estimate   # time a few steps per row, extrapolate
  dacnn reproduce table1 table2 --scale cpu       # run what is missing (re-run to resume)
  dacnn reproduce all --scale smoke               # every spec end to end in seconds per row
  dacnn reproduce table4 --scale cpu --rows none,all
  dacnn reproduce table1 table2 --scale cpu --jobs 2 --resume   # two 1-thread processes, resumable
  dacnn report                                    # docs/results.md + docs/figures/*.png
"""


def register(subparsers: Any) -> None:

    p = subparsers.add_parser(
        "reproduce", help="run a paper's table or figure (paper|cpu|smoke scale), skipping finished rows",
        description="Run the rows of experiment specs that have no result yet for this config and code "
                    "version; a killed run resumes where it stopped.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                   help="spec names (table1..table8, figure4..figure7, lrunet_sweep, kernel_sharing) or all")
    p.add_argument("--scale", choices=SCALES, help="paper, cpu or smoke (required to run)")
    p.add_argument("--rows", help="comma-separated row ids (default: every row of the scale)")
    p.add_argument("--list", action="store_true", help="list specs (or one spec's rows) with their status")
    p.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    p.add_argument("--estimate", action="store_true", help="time a few steps per missing row, extrapolate")
    p.add_argument("--force", action="store_true", help="re-run rows that already have a result")
    p.add_argument("--results", default="results", help="results store directory (default: results)")
    p.add_argument("--runs-dir", default="runs/reproduce", help="training runs directory")
    p.add_argument("--data-dir", help="data root (default: $DACNN_DATA, then the data package's default)")
    p.add_argument("--device", help="override the device (cpu, cuda, auto)")
    p.add_argument("--spec-dir", type=Path, default=None, help="spec YAML directory (default: built-in)")
    p.add_argument("--threads", type=option_type("threads"), metavar="N",
                   help="torch CPU threads (1 is several times faster when other jobs load the cores)")
    p.add_argument("--jobs", type=option_type("jobs"), default=1, metavar="N",
                   help="train N rows at once, each in its own single-threaded process (logs in "
                        "<runs-dir>/<scale>/logs/); 2 suits a 2-core CPU")
    p.add_argument("--seeds", help="comma-separated: run only these seeds of rows that run over several")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a training setting over the spec's (YAML value; repeatable), e.g. epochs=5, "
                        "amp=bf16; part of the config hash, so its records never pass for the spec's")
    p.add_argument("--resume", action="store_true",
                   help="continue interrupted runs where their last checkpoint left them")
    p.add_argument("--allow-dirty", action="store_true",
                   help="record even though src/ has uncommitted changes (the record stores the diff's hash "
                        "and the report marks it)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines from training")
    p.add_argument("--record-every-epoch", action="store_true",
                   help="after every epoch keep the run's record so far (curve, no test accuracy) in "
                        "<results>/partial/<experiment>.jsonl, so a killed run still leaves its curve")
    p.add_argument("--note", help="text stored in each record's extra.note (e.g. why the epochs differ)")
    p.set_defaults(func=run_reproduce)

    r = subparsers.add_parser("report", help="rebuild docs/results.md and its plots from the results store",
                              description="Regenerate the results report from results/*.jsonl alone; text in "
                                          "the reading blocks of the existing file is kept.")
    r.add_argument("--results", default="results", help="results store directory (default: results)")
    r.add_argument("--output", default="docs/results.md", help="markdown file to write")
    r.add_argument("--figures", help="directory of the PNGs (default: <output dir>/figures)")
    r.add_argument("--spec-dir", type=Path, default=None, help="spec YAML directory (default: built-in)")
    r.add_argument("--scales", default="paper,cpu", help="comma-separated scales (default paper,cpu)")
    r.add_argument("--allow-empty", action="store_true",
                   help="write the report even when the store has no records (else refused)")
    r.set_defaults(func=run_report)


def _spec_dir(args: argparse.Namespace) -> Path:

    return args.spec_dir or SPEC_DIR


def _names(args: argparse.Namespace) -> list[str]:

    names = args.experiments or []
    if names == ["all"] or (not names and args.list):
        return spec_names(_spec_dir(args))
    for name in names:
        get_spec(name, _spec_dir(args))
    return names


def _options(args: argparse.Namespace, scale: str) -> Any:

    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else None
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    overrides = {}
    for item in args.override:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--override: expected KEY=VALUE, got {item!r}")
        overrides[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return RunOptions(scale=scale, results=Path(args.results), runs_dir=Path(args.runs_dir),
                      data_dir=args.data_dir, device=args.device, force=args.force, verbose=not args.quiet,
                      rows=rows, threads=args.threads, spec_dir=_spec_dir(args), resume=args.resume,
                      allow_dirty=args.allow_dirty, command=command_line(args), jobs=args.jobs, seeds=seeds,
                      overrides=overrides, partial_records=args.record_every_epoch, note=args.note)


def command_line(args: argparse.Namespace) -> str:
    """The ``dacnn reproduce`` command that ``args`` came from (every option that was set, in one form)."""
    parts = ["dacnn", "reproduce", *args.experiments]
    for option, value in (("--scale", args.scale), ("--rows", args.rows), ("--seeds", args.seeds),
                          ("--threads", args.threads), ("--jobs", None if args.jobs == 1 else args.jobs),
                          ("--device", args.device), ("--results", args.results),
                          ("--runs-dir", args.runs_dir), ("--data-dir", args.data_dir),
                          ("--spec-dir", args.spec_dir)):
        defaults = {"--results": "results", "--runs-dir": "runs/reproduce"}
        if value is not None and value != defaults.get(option):
            parts += [option, str(value)]
    for item in args.override:
        parts += ["--override", item]
    for flag in ("force", "resume", "allow_dirty", "quiet", "record_every_epoch"):
        if getattr(args, flag):
            parts.append("--" + flag.replace("_", "-"))
    return shlex.join(parts)


def _list(args: argparse.Namespace, names: list[str]) -> int:

    store = ResultsStore(Path(args.results))
    scales = [args.scale] if args.scale else list(SCALES)
    if len(names) > 1 or not args.experiments:
        print(f"{'experiment':16s} {'kind':7s} " + " ".join(f"{s:>7s}" for s in scales) + "  title")
        for name in names:
            spec = get_spec(name, _spec_dir(args))
            counts = []
            for scale in scales:
                _, planned = plan(spec, _options(args, scale))
                runnable = [p for p in planned if p.row.kind != "quoted"]
                done = sum(row_status(p, store) == "done" for p in runnable)
                counts.append(f"{done:>3d}/{len(runnable):<3d}")
            print(f"{name:16s} {spec.kind:7s} " + " ".join(counts) + f"  {spec.title}")
        return 0
    spec = get_spec(names[0], _spec_dir(args))
    for scale in scales:
        target, planned = plan(spec, _options(args, scale))
        print(f"{spec.name} at {scale} scale (results in {store.path(target.name, scale)}):")
        for p in planned:
            print(f"  {p.run_id:22s} {row_status(p, store):8s} {p.row.label}")
    return 0


def _estimate(args: argparse.Namespace, names: list[str], scale: str) -> int:

    store = ResultsStore(Path(args.results))
    grand = 0.0
    earlier: dict[str, str] = {}  # hash -> row that an earlier spec of this command runs
    for name in names:
        _, planned = plan(get_spec(name, _spec_dir(args)), _options(args, scale))
        total = 0.0
        print(f"{name} at {scale} scale:")
        by_id = {p.row.id: p for p in planned}
        for p in planned:
            status = row_status(p, store)
            if p.chash in earlier:
                status = f"shared with {earlier[p.chash]}"
            earlier.setdefault(p.chash, f"{name}/{p.row.id}")
            if status in ("done", "shared", "quoted") or status.startswith("shared with"):
                print(f"  {p.run_id:22s} {status}")
                continue
            source = by_id.get(p.row.prune.get("source", ""))
            seconds, why = estimate_row(p, config_from_dict(source.train) if source else None)
            total += seconds
            print(f"  {p.run_id:22s} ~{format_duration(seconds):>8s}  ({why})", flush=True)
        print(f"  total ~{format_duration(total)}")
        grand += total
    if len(names) > 1:
        print(f"all: ~{format_duration(grand)}")
    return 0


def run_reproduce(args: argparse.Namespace) -> int:

    names = _names(args)
    if args.list:
        return _list(args, names)
    if not names:
        raise ConfigError("name an experiment (or all); `dacnn reproduce --list` shows them")
    if args.scale is None:
        raise ConfigError("--scale is required: paper (the paper's protocol), cpu (reduced), smoke (seconds)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.estimate:
        return _estimate(args, names, args.scale)
    if args.jobs > 1 and not args.dry_run:
        return run_campaign(names, _options(args, args.scale))
    for name in names:
        reproduce(name, _options(args, args.scale), dry_run=args.dry_run)
    return 0


def run_report(args: argparse.Namespace) -> int:

    scales = [s.strip() for s in args.scales.split(",") if s.strip()]
    bad = [s for s in scales if s not in SCALES]
    if bad:
        raise ConfigError(f"--scales: unknown scale {bad[0]!r} (scales: {', '.join(SCALES)})")
    path = build_report(args.results, args.output, args.figures, scales, spec_dir=_spec_dir(args),
                        allow_empty=args.allow_empty)
    print(f"wrote {path}")
    return 0
