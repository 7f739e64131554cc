"""``dacnn results merge DIR``: append a GPU run's records to ``results/``, then rebuild the report.

A thin layer over :func:`dacnn.experiments.merge.merge_records` (the checks) and
:func:`dacnn.experiments.report.build_report` (what ``dacnn report`` writes).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dacnn.experiments.merge import merge_records
from dacnn.experiments.report import build_report
from dacnn.experiments.spec import SPEC_DIR

EPILOG = """examples:
  dacnn results merge /work/.device/files/run-1     # what scripts/gpu-campaign left in $OUT
  dacnn results merge out/results --no-report       # append only
"""


def register(subparsers: Any) -> None:

    p = subparsers.add_parser("results", help="the results store: merge records made elsewhere",
                              description="Work on the results store (results/*.jsonl).")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    m = sub.add_parser("merge", help="append a GPU run's records to results/, then rebuild docs/results.md",
                       description="Check every record under DIR (clean, a commit of this repository with "
                                   "the record's source hash, a known spec and row), append the new ones to "
                                   "the store (never rewriting a line), then regenerate the report as "
                                   "`dacnn report` does. One bad record refuses the whole merge.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("source", metavar="DIR", help="the folder that came back ($OUT), or its results/ folder")
    m.add_argument("--results", default="results", help="results store directory (default: results)")
    m.add_argument("--output", default="docs/results.md", help="report to regenerate (docs/results.md)")
    m.add_argument("--figures", help="directory of the report's PNGs (default: <output dir>/figures)")
    m.add_argument("--spec-dir", type=Path, default=None, help="spec YAML directory (default: built-in)")
    m.add_argument("--no-report", action="store_true", help="append only; do not regenerate the report")
    m.set_defaults(func=run_merge)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def run_merge(args: argparse.Namespace) -> int:

    spec_dir = args.spec_dir or SPEC_DIR
    result = merge_records(args.source, args.results, spec_dir=spec_dir)
    for path, n in sorted(result.appended.items()):
        print(f"appended {n} record{'s' if n != 1 else ''} to {path}")
    partial = f" ({result.partial} of runs stopped mid-way)" if result.partial else ""
    print(f"merged {result.total} records{partial}; {result.skipped} already in the store or superseded")
    if not args.no_report:
        path = build_report(args.results, args.output, args.figures, ("paper", "cpu"), spec_dir=spec_dir)
        print(f"wrote {path}")
    return 0
