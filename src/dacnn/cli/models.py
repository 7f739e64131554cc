"""``dacnn models``: every registered model with its parameter and FLOP figures.

``dacnn models [--pattern P] [--paper] [--json | --markdown] [--no-flops]`` lists, per model, unique
parameters, per-use parameters (the free-weight twin's size), the compression ratio and forward
GFLOPs of one image at the model's input size. ``--paper`` adds the DACNN paper's figure beside each
model and a table of every parameter figure of its Tables 2-6 (:mod:`dacnn.analysis.paper_figures`).
``docs/parameters.md`` is ``dacnn models --paper --markdown``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from torch import nn

from dacnn.analysis.paper_figures import (
    PAPER,
    READING_NOTES,
    Comparison,
    compare,
    compare_figures,
    figure_for_model,
)
from dacnn.counting import count_flops, count_params
from dacnn.errors import ConfigError
from dacnn.hub import weights_dirs
from dacnn.registry import create_model, list_models, list_pretrained, pretrained_cfg

__all__ = ["register", "model_rows", "run"]

DOCS_COMMAND = "dacnn models --paper --markdown > docs/parameters.md"
QUANTITY_LABELS = {"unique": "params", "free": "free twin"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` subcommand."""
    parser = subparsers.add_parser(
        "models",
        help="list registered models with parameter counts and FLOPs",
        description="List registered models: unique and per-use parameters, compression, GFLOPs.",
    )
    parser.add_argument("--pattern", default="*", metavar="P", help="fnmatch pattern, e.g. 'dacnn*'")
    parser.add_argument("--paper", action="store_true",
                        help=f"compare with every parameter figure of the DACNN paper ({PAPER})")
    parser.add_argument("--pretrained", action="store_true",
                        help="list pretrained weights by name (<model>.<tag>), dataset, published accuracy")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="machine-readable output")
    out.add_argument("--markdown", action="store_true", help="markdown tables (docs/parameters.md)")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting (faster)")
    parser.set_defaults(func=run)


def model_rows(pattern: str = "*", *, flops: bool = True, paper: bool = False) -> list[dict[str, Any]]:
    """One dict per registered model matching ``pattern`` (see the module docstring for fields)."""
    names = list_models(pattern)
    if not names:
        raise ConfigError(f"--pattern {pattern!r} matches no registered model (see `dacnn models`)")
    rows = []
    for name in names:
        model = create_model(name)
        info = model.info
        counts = count_params(model)
        row: dict[str, Any] = {
            "name": name,
            "family": info.family,
            "paper": info.paper,
            "table_row": info.table_row,
            "input_size": list(info.input_size),
            "num_classes": info.num_classes,
            "unique": counts.unique,
            "per_use": counts.per_use,
            "compression": round(counts.compression, 4),
            "shared_tensors": len(counts.shared),
            "flops": _forward_flops(name, model) if flops else None,
        }
        if paper:
            figure = figure_for_model(name)
            row["paper_figure"] = _comparison_dict(compare(figure)) if figure else None
        rows.append(row)
    return rows


def _forward_flops(name: str, model: nn.Module) -> int:
    """Forward FLOPs of one image at ``model.info.input_size``, counted on the meta device.

    The meta device propagates shapes without arithmetic, so this is fast for any model size; it
    moves ``model`` to ``meta`` (call it last). A model that cannot run on meta is rebuilt and
    counted on the CPU.
    """
    input_size = model.info.input_size
    try:
        return count_flops(model.to("meta"), input_size)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return count_flops(create_model(name), input_size)


def _comparison_dict(c: Comparison) -> dict[str, Any]:
    f = c.figure
    return {
        "table": f.table,
        "row": f.row,
        "model": f.model,
        "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in f.kwargs},
        "quantity": f.quantity,
        "reference": f.reference,
        "printed": f"{f.printed}{f.symbol}",
        "printed_params": int(f.target),
        "tolerance": int(f.tolerance),
        "ours": c.ours,
        "difference": c.difference,
        "match": c.within,
        "ours_without_bn": c.ours_without_bn,
        "match_without_bn": c.within_without_bn,
    }


def _summary(comparisons: list[Comparison]) -> dict[str, Any]:
    total = Counter(c.figure.table for c in comparisons)
    matched = Counter(c.figure.table for c in comparisons if c.within)
    return {
        "matched": sum(matched.values()),
        "total": len(comparisons),
        "by_table": {t: {"matched": matched[t], "total": n} for t, n in total.items()},
    }


def _summary_line(summary: dict[str, Any]) -> str:
    parts = ", ".join(f"{t} {v['matched']}/{v['total']}" for t, v in summary["by_table"].items())
    return (f"{summary['matched']} of {summary['total']} printed parameter figures match our models "
            f"to the printed precision ({parts}).")


def _quantity(c: Comparison) -> str:
    f = c.figure
    return f"extra vs {f.reference}" if f.quantity == "extra" else QUANTITY_LABELS[f.quantity]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _model_table(rows: list[dict[str, Any]], paper: bool) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "family", "paper row", "unique", "per-use", "x", "GFLOPs"]
    if paper:
        headers += ["paper", "ours - paper", "match"]
    body = []
    for r in rows:
        line = [
            r["name"], r["family"], r["table_row"] or "-", f"{r['unique']:,}", f"{r['per_use']:,}",
            f"{r['compression']:.2f}", "-" if r["flops"] is None else f"{r['flops'] / 1e9:.3f}",
        ]
        if paper:
            p = r["paper_figure"]
            line += ["-", "-", "-"] if p is None else [
                f"{p['printed']} ({p['table']})", f"{p['difference']:+,}", _yes(p["match"])
            ]
        body.append(line)
    return headers, body


def _figure_table(comparisons: list[Comparison]) -> tuple[list[str], list[list[str]]]:
    headers = ["table", "row", "model", "quantity", "paper", "ours", "ours - paper", "match",
               "ours w/o BN", "match w/o BN"]
    body = [
        [c.figure.table, c.figure.row, c.figure.label, _quantity(c), f"{c.figure.printed}{c.figure.symbol}",
         f"{c.ours:,}", f"{c.difference:+,}", _yes(c.within), f"{c.ours_without_bn:,}",
         _yes(c.within_without_bn)]
        for c in comparisons
    ]
    return headers, body


def _is_number(cell: str) -> bool:
    return cell[:1] in "+-0123456789" and cell not in ("-",) and cell[-1:].isdigit()


def _text_table(headers: list[str], body: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(headers, *body)]
    right = [all(_is_number(row[i]) or row[i] == "-" for row in body) for i in range(len(headers))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, body)])


def _markdown_table(headers: list[str], body: list[list[str]]) -> str:
    right = [all(_is_number(row[i]) or row[i] == "-" for row in body) for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _render_markdown(rows: list[dict[str, Any]], comparisons: list[Comparison] | None) -> str:

    out = [f"<!-- generated by `{DOCS_COMMAND}`; do not edit by hand -->", "", "# Parameters", ""]
    out += [f"Generated by `{DOCS_COMMAND}`.", "",
            "*unique*: trainable parameters, each shared tensor once (what the papers call # params); "
            "*per-use*: every use of a shared tensor counted (the same network with free weights); "
            "*x*: per-use / unique; *GFLOPs*: forward pass of one image at the model's input size, "
            "every use of a shared kernel counted, a multiply-add = 2 FLOPs.", "", "## Registered models", ""]
    out.append(_markdown_table(*_model_table(rows, comparisons is not None)))
    if comparisons is not None:
        out += ["", f"## The DACNN paper's parameter figures ({PAPER}, Tables 2-6)", "",
                _summary_line(_summary(comparisons)), "",
                "A figure matches when |ours - paper| is at most half a unit of its last printed digit "
                "(0.164 M: 500 parameters; 32K: 512). *free twin*: Table 2's numbers in parentheses, "
                "our per-use count; *extra*: our unique count minus the reference model's.", "",
                _markdown_table(*_figure_table(comparisons)), "", READING_NOTES.rstrip()]
    return "\n".join(out) + "\n"


def _render_text(rows: list[dict[str, Any]], comparisons: list[Comparison] | None) -> str:
    out = [_text_table(*_model_table(rows, comparisons is not None))]
    if comparisons is not None:
        out += ["", f"Parameter figures of the DACNN paper ({PAPER}):",
                _text_table(*_figure_table(comparisons)), "", _summary_line(_summary(comparisons)),
                "See docs/parameters.md for why the others differ."]
    return "\n".join(out) + "\n"


def pretrained_rows(pattern: str = "*") -> list[dict[str, Any]]:
    """One row per pretrained name matching ``pattern`` (the table of :func:`dacnn.list_pretrained`)."""
    rows = []
    for name in list_pretrained(pattern if "." in pattern else f"{pattern}.*"):
        cfg = pretrained_cfg(name)
        rows.append({"name": name, "dataset": cfg.dataset, "accuracy": cfg.accuracy, "file": cfg.file,
                     "sha256": cfg.sha256, "source": cfg.source, "licence": cfg.licence,
                     "model_kwargs": cfg.model_kwargs, "command": cfg.command, "notes": cfg.notes})
    return rows


def _run_pretrained(args: argparse.Namespace) -> int:
    rows = pretrained_rows(args.pattern)
    if args.json:
        sys.stdout.write(json.dumps({"pretrained": rows}, indent=2) + "\n")
        return 0
    headers = ["name", "dataset", "published top-1 %", "file"]
    body = [[r["name"], r["dataset"], f"{r['accuracy']:.2f}", r["file"]] for r in rows]
    table = _markdown_table(headers, body) if args.markdown else _text_table(headers, body)
    dirs = ", ".join(str(d) for d in weights_dirs())
    sys.stdout.write(f"{table}\nweights are looked for in: {dirs} (--weights-dir, $DACNN_WEIGHTS)\n")
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``dacnn models``."""
    if args.pretrained:
        return _run_pretrained(args)
    rows = model_rows(args.pattern, flops=not args.no_flops, paper=args.paper)
    comparisons = compare_figures() if args.paper else None
    if args.json:
        payload: dict[str, Any] = {"models": rows}
        if comparisons is not None:
            payload["figures"] = [_comparison_dict(c) for c in comparisons]
            payload["summary"] = _summary(comparisons)
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    elif args.markdown:
        sys.stdout.write(_render_markdown(rows, comparisons))
    else:
        sys.stdout.write(_render_text(rows, comparisons))
    return 0
