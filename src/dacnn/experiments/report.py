"""``dacnn report``: rebuild ``docs/results.md`` and its plots from the results store alone.

Per spec and scale: a table with the paper's numbers and ours side by side (scale, dataset and
protocol stated), the spec's comparisons written out as sentences ("sharing the kernel costs X
points at cpu scale; the paper: Y"), and the plots. Hand-written text survives regeneration: anything
between ``<!-- reading:NAME:begin -->`` and ``<!-- reading:NAME:end -->`` in the existing file is
carried over (``summary`` at the top, one block per experiment).

A row run over several seeds shows mean ± standard deviation; a comparison of two such rows says
whether it is *resolved* (the difference of the means exceeds twice its standard error,
``sqrt(sd_a^2/n_a + sd_b^2/n_b)``) and in which direction, beside the paper's figure. Records from
an older protocol (config hash) are marked †, records made from a dirty tree ‡, records run with
``--override`` settings (a lent GPU's shortened schedule) §, and a run stopped before its last epoch
(a partial record: curve so far, no test error) says so in its label and its epochs cell.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dacnn.analysis.activation_max import load_filters
from dacnn.errors import ConfigError
from dacnn.experiments import plots
from dacnn.experiments.planning import RunOptions, plan
from dacnn.experiments.spec import SPEC_DIR, Spec, get_spec, load_specs, rows_at_scale
from dacnn.experiments.store import ResultsStore, is_partial
from dacnn.train.runlog import format_duration

__all__ = ["build_report", "read_blocks"]

BLOCK = re.compile(r"<!-- reading:([\w-]+):begin -->\n?(.*?)<!-- reading:\1:end -->", re.DOTALL)
PLACEHOLDER = "_No reading written yet._\n"
SCALE_WORDS = {"paper": "paper scale (the paper's protocol)", "cpu": "cpu scale (the 2-core CPU protocol)",
               "smoke": "smoke scale (pipeline check only: the numbers mean nothing)"}


def read_blocks(path: Path) -> dict[str, str]:
    """The hand-written reading blocks of an existing report, by name."""
    if not path.is_file():
        return {}
    return {m.group(1): m.group(2) for m in BLOCK.finditer(path.read_text(encoding="utf-8"))}


def _block(name: str, blocks: dict[str, str]) -> list[str]:
    body = blocks.get(name, PLACEHOLDER)
    return [f"<!-- reading:{name}:begin -->", body.rstrip("\n"), f"<!-- reading:{name}:end -->", ""]


def _count(n: int | None) -> str:
    if n is None:
        return "—"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f} M"
    if n >= 1_000:
        return f"{n / 1e3:.1f} K"
    return str(n)


def _num(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def _current_hashes(spec: Spec, scale: str) -> dict[str, set[str]]:
    """Config hashes (one per seed) the spec resolves to now; records with another hash are from an
    older protocol."""

    try:
        _, planned = plan(spec, RunOptions(scale=scale))
    except Exception:  # noqa: BLE001 - a spec that no longer resolves: mark nothing stale
        return {}
    hashes: dict[str, set[str]] = {}
    for p in planned:
        hashes.setdefault(p.row.id, set()).add(p.chash)
    return hashes


def is_dirty(record: dict[str, Any]) -> bool:
    """Made from a tree whose ``src/`` had uncommitted changes (older records: ``+dirty`` commit)."""
    return bool(record.get("dirty")) or str(record.get("git_commit", "")).endswith("+dirty")


def is_overridden(record: dict[str, Any]) -> bool:
    """Run with ``--override`` settings over the spec's (its command says which)."""
    return "--override" in str(record.get("command") or "")


def _errors(recs: Sequence[dict[str, Any]]) -> list[float]:
    return [r["test_error"] for r in recs if r.get("test_error") is not None]


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``None`` for the sd of fewer than two values)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _binomial_se(record: dict[str, Any], error: float) -> float:
    """Points of standard error of a test error measured on ``test_images`` images (nan if unknown)."""
    n = record.get("test_images") or 0
    return 100.0 * math.sqrt(error / 100 * (1 - error / 100) / n) if n else math.nan


def _error_cell(recs: Sequence[dict[str, Any]], accuracy: bool = False) -> str:
    """Mean test error (or accuracy, ``100 - error``) over the seeds, ± sd when there are several."""
    errors = _errors(recs)
    mean, sd = mean_sd([100.0 - e for e in errors] if accuracy else errors)
    if mean is None:
        return "—"
    return f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f} (n={len(errors)})"


def _paper_params(row: Any) -> str:
    return "—" if row.paper.get("params_m") is None else f"{row.paper['params_m']} M"


def _relative(row: Any, records: dict[str, dict[str, Any]]) -> tuple[float | None, float | None, int | None]:
    """``(accuracy drop, % of parameters removed, extra parameters)`` against the row's baseline."""
    base_id = row.baseline or row.prune.get("source")
    rec, base = records.get(row.id), records.get(base_id) if base_id else None
    if rec is None or base is None or rec.get("test_acc") is None or base.get("test_acc") is None:
        return None, None, None
    drop = base["test_acc"] - rec["test_acc"]
    ratio = 100.0 * (1.0 - rec["unique_params"] / base["unique_params"]) if base["unique_params"] else None
    return drop, ratio, rec["unique_params"] - base["unique_params"]


def _table(spec: Spec, rows: Sequence[Any], runs: dict[str, list[dict[str, Any]]], stale: set[str],
           dirty: set[str], overridden: set[str] = frozenset(), partial: set[str] = frozenset()) -> list[str]:
    records = {row_id: recs[0] for row_id, recs in runs.items()}
    has_extra = any("extra_params" in r.paper for r in rows)
    has_drop = any("acc_drop" in r.paper for r in rows)
    has_acc = any("accuracy" in r.paper for r in rows)
    head = ["row", "paper err. (%)", "ours err. (%)"]
    head += ["paper acc. (%)", "ours acc. (%)"] if has_acc else []
    head += ["paper params", "ours params"]
    head += ["paper extra", "ours extra"] if has_extra else []
    head += ["paper acc. drop", "ours acc. drop", "paper prune ratio", "ours prune ratio"] if has_drop else []
    head += ["per-use params", "GFLOPs", "epochs", "data (train/val/test)", "time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        rec = records.get(row.id)
        label = row.label + (" (quoted)" if row.kind == "quoted" else "") + (" †" if row.id in stale else "")
        label += " ‡" if row.id in dirty else ""
        label += (" §" if row.id in overridden else "") + (" (partial)" if row.id in partial else "")
        drop, ratio, extra = _relative(row, records)
        cells = [label, _num(row.paper.get("error")), _error_cell(runs.get(row.id, []))]
        cells += [_num(row.paper.get("accuracy")), _error_cell(runs.get(row.id, []), accuracy=True)] \
            if has_acc else []
        cells += [_paper_params(row), _count(rec.get("unique_params")) if rec else "—"]
        cells += [str(row.paper.get("extra_params", "—")), _count(extra)] if has_extra else []
        if has_drop:
            ratio_paper = row.paper.get("prune_ratio")
            cells += [_num(row.paper.get("acc_drop")), _num(drop), _num(ratio_paper, 1, " %") if ratio_paper
                      is not None else "—", _num(ratio, 1, " %")]
        if rec:
            sizes = "/".join(str(rec.get(k)) for k in ("train_images", "val_images", "test_images"))
            data = f"{rec['dataset']} {sizes}"
            flops = None if rec.get("flops") is None else rec["flops"] / 1e9
            epochs, duration = str(rec.get("epochs")), _duration(rec.get("wall_time"))
            if is_partial(rec):
                epochs = f"{rec['extra']['partial'].get('epochs_done')} of {epochs}"
            source = runs.get(row.prune.get("source", ""))
            if row.kind == "prune" and source:  # the source's training, then the fine-tuning on top
                epochs, duration = f"{source[0].get('epochs')} + {epochs}", f"+ {duration}"
            cells += [_count(rec.get("per_use_params")), _num(flops, 3), epochs, data, duration]
        else:
            cells += ["—"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _duration(seconds: float | None) -> str:

    return "—" if seconds is None else format_duration(seconds)


def _comparisons(spec: Spec, runs: dict[str, list[dict[str, Any]]], scale: str) -> list[str]:
    out = []
    for comp in spec.comparisons:
        a, b = spec.row(comp["a"]), spec.row(comp["b"])
        paper = comp.get("paper_delta")
        if paper is None and a.paper.get("error") is not None and b.paper.get("error") is not None:
            paper = b.paper["error"] - a.paper["error"]
        ea, eb = _errors(runs.get(a.id, [])), _errors(runs.get(b.id, []))
        text = f"- {comp.get('label', f'{b.label} vs {a.label}')}: error of *{b.label}* minus *{a.label}*"
        if ea and eb:
            (ma, sa), (mb, sb) = mean_sd(ea), mean_sd(eb)
            ours = mb - ma
            dataset = runs[a.id][0]["dataset"]
            text += f" = **{ours:+.2f} points** at {scale} scale ({dataset}, n={len(ea)}/{len(eb)})"
            direction = ("higher" if ours > 0 else "lower") + " error"
            if sa is not None and sb is not None:
                se = math.sqrt(sa**2 / len(ea) + sb**2 / len(eb))
                verdict = f"resolved: {direction}" if abs(ours) > 2 * se else "not resolved"
                text += f", standard error {se:.2f}: {verdict}"
            else:  # one seed: only the test set's sampling error is known, not the seed-to-seed spread
                se = _binomial_se(runs[a.id][0], ma) ** 2 + _binomial_se(runs[b.id][0], mb) ** 2
                se = math.sqrt(se) if not math.isnan(se) else None
                if se is not None and abs(ours) > 2 * se:
                    text += (f", one seed: resolved against test-set noise only (standard error {se:.2f}; "
                             f"seed spread not measured): {direction}")
                else:
                    text += ", one seed: not resolved"
        else:
            ours = None
            text += f": not measured at {scale} scale yet"
        text += f"; paper: {paper:+.2f} points" if paper is not None else "; paper: no number"
        if ours is not None and paper is not None and abs(paper) > 1e-9:
            text += ", same direction" if (ours > 0) == (paper > 0) else ", **opposite direction**"
        out.append(text + ".")
    return out


def _plots(spec: Spec, source: Spec, rows: Sequence[Any], records: dict[str, dict[str, Any]], scale: str,
           figures: Path, store: ResultsStore, caption: str) -> list[Path]:
    made = []
    for kind in spec.plots:
        path = figures / f"{spec.name}_{kind}_{scale}.png"
        title = f"{spec.title} — {scale} scale"
        if kind == "error_vs_params":
            made.append(plots.plot_error_vs_params(path, rows, records, title, caption))
        elif kind in ("frontier", "frontier_cpu_time"):
            by_params = kind == "frontier"
            made.append(plots.plot_frontier(
                path, rows, records, title, caption, source.strategy,
                (lambda rec: (rec.get("unique_params") or 0) / 1e6) if by_params else _cpu_hours,
                "unique parameters (M)" if by_params else "training CPU time (CPU-hours, one thread)"))
        elif kind == "curves":
            made.append(plots.plot_curves(path, rows, records, title, caption))
        elif kind in ("depth", "reuse"):
            label = {"depth": "depth (weight layers)", "reuse": "layer reuse N"}[kind]
            made.append(plots.plot_sweep(path, rows, records, title, label, caption))
        elif kind == "filters":

            for row in rows:
                rec = records.get(row.id)
                artifact = (rec or {}).get("extra", {}).get("artifact")
                if artifact and (store.scale_dir(scale) / artifact).is_file():
                    images, layers = load_filters(store.scale_dir(scale) / artifact)
                    made.append(plots.plot_filters(path, images, layers, f"{title}: {row.label}"))
    return made


def _provenance(records: Sequence[dict[str, Any]]) -> str:
    def values(key: str) -> str:
        return ", ".join(sorted({str(r.get(key)) for r in records if r.get(key) is not None})) or "—"

    sums = sorted({f"{r['dataset']} {r['dataset_checksum']}" for r in records if r.get("dataset_checksum")})
    return (f"Provenance: git {values('git_commit')}; source {values('source_hash')}; "
            f"device {values('device')}; torch {values('torch_version')}; "
            f"dataset checksums {', '.join(sums) or '—'}.")


def _scale_section(spec: Spec, scale: str, store: ResultsStore, figures: Path, doc_dir: Path) -> list[str]:
    source = get_spec(spec.from_spec, spec.path.parent) if spec.from_spec else spec
    scale_info = source.scales.get(scale)
    all_runs = store.runs(source.name, scale)
    if spec.row_ids:
        rows = [source.row(i) for i in spec.row_ids]
    else:
        rows = rows_at_scale(source, scale) if scale in source.scales else list(source.rows)
    runs = {r.id: all_runs[r.id] for r in rows if r.id in all_runs}
    records = {row_id: _mean_record(recs) for row_id, recs in runs.items()}  # what the plots draw
    lines = [f"### {SCALE_WORDS.get(scale, scale)}", ""]
    if scale_info is not None and scale_info.note:
        lines += [f"Protocol: {scale_info.note}", ""]
    if not records:
        return lines + [f"Not run at {scale} scale yet (`dacnn reproduce {spec.name} --scale {scale}`).", ""]
    hashes = _current_hashes(source, scale)
    overridden = {i for i, recs in runs.items() if any(is_overridden(r) for r in recs)}
    stale = {i for i, recs in runs.items() if i in hashes and any(r.get("config_hash") not in hashes[i]
                                                                   for r in recs)} - overridden
    dirty = {i for i, recs in runs.items() if any(is_dirty(r) for r in recs)}
    partial = {i for i, recs in runs.items() if any(is_partial(r) for r in recs)}
    datasets = sorted({r["dataset"] for r in records.values() if r.get("dataset")})
    caption = f"ours, {scale} scale ({', '.join(datasets)})"
    if spec.from_spec is None or not spec.plots:
        lines += _table(source, rows, runs, stale, dirty, overridden, partial) + [""]
        if any(r.kind == "prune" and r.id in runs for r in rows):
            lines += ["A pruned row's epochs: its source's training + the fine-tuning; its time: the "
                      "fine-tuning's, on top of the source's.", ""]
    if stale:
        lines += ["† result of an earlier protocol (its config hash differs from the spec's now).", ""]
    if dirty:
        lines += ["‡ recorded from a tree with uncommitted source changes (`--allow-dirty`).", ""]
    if overridden:
        lines += ["§ run with `--override` settings over the protocol (the record's command and `extra.note` "
                  "say which: e.g. the epochs a lent GPU affords, the paper's schedule scaled to them).", ""]
    if partial:
        lines += ["(partial): stopped before its last epoch; the curve and best validation epoch so far, "
                  "no test error.", ""]
    if not spec.from_spec:
        lines += _comparisons(source, runs, scale) + ([""] if source.comparisons else [])
        if source.budgets:
            lines += _which_wins(source, rows, runs) + _baseline_view(source, rows, runs)
    for path in _plots(spec, source, rows, records, scale, figures, store, caption):
        lines += [f"![{spec.title}, {scale} scale]({os.path.relpath(path, doc_dir)})", ""]
    lines += [_provenance([r for recs in runs.values() for r in recs]), ""]
    return lines


def _runs_done(spec: Spec, scale: str, store: ResultsStore) -> str:
    """``done/planned`` runs (each seed of a row is a run) with the spec's configuration now."""

    source = get_spec(spec.from_spec, spec.path.parent) if spec.from_spec else spec
    if scale not in source.scales:
        return "—"
    target, planned = plan(spec, RunOptions(scale=scale, spec_dir=spec.path.parent))
    planned = [p for p in planned if p.row.kind != "quoted"]
    recorded = {(r["row"], r.get("config_hash"))
                for recs in store.runs(target.name, scale).values() for r in recs if not is_partial(r)}
    return f"{sum((p.row.id, p.chash) in recorded for p in planned)}/{len(planned)}"


def _mean_record(recs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The first seed's record with the mean test error (and training CPU time) over the seeds."""
    mean, _ = mean_sd(_errors(recs))
    cpu, _ = mean_sd([r["extra"]["cpu_time"] for r in recs if (r.get("extra") or {}).get("cpu_time")])
    extra = {**(recs[0].get("extra") or {}), **({"cpu_time": cpu} if cpu is not None else {})}
    return {**recs[0], "test_error": mean, "test_acc": None if mean is None else 100.0 - mean, "extra": extra}


def _cpu_hours(record: dict[str, Any]) -> float | None:
    seconds = (record.get("extra") or {}).get("cpu_time")
    return None if seconds is None else seconds / 3600


def _uncertainty(recs: Sequence[dict[str, Any]]) -> tuple[float | None, float | None, str]:
    """Mean error and its standard error: over seeds (sd / sqrt(n)) when there are several, else the
    test set's binomial error alone (the seed spread unmeasured)."""
    errors = _errors(recs)
    mean, sd = mean_sd(errors)
    if mean is None:
        return None, None, ""
    if sd is not None:
        return mean, sd / math.sqrt(len(errors)), f"n={len(errors)}"
    se = _binomial_se(recs[0], mean)
    return mean, None if math.isnan(se) else se, "n=1"


def _which_wins(spec: Spec, rows: Sequence[Any], runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line per parameter budget: the best row of each strategy in it and the winner, resolved
    when its lead over the runner-up exceeds twice their combined standard error."""
    names = list(spec.strategies)
    head = ["unique parameters"] + names + ["winner", "lead (points)"]
    lines = ["At each budget, the lowest-error row of each strategy (mean ± standard error: over seeds "
             "where n ≥ 2, else the test set's binomial error only, the seed-to-seed spread unmeasured):",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for low, high in spec.budgets:
        best: dict[str, tuple[float, float | None, Any, str]] = {}
        for row in rows:
            name, recs = spec.strategy(row), runs.get(row.id)
            if name is None or not recs or not low <= (recs[0].get("unique_params") or -1) <= high:
                continue
            mean, se, n = _uncertainty(recs)
            if mean is not None and (name not in best or mean < best[name][0]):
                best[name] = (mean, se, row, n)
        cells = [f"{_count(low)}–{_count(high)}"]
        for name in names:
            if name in best:
                mean, se, row, n = best[name]
                params = _count(runs[row.id][0].get("unique_params"))
                spread = f" ± {se:.2f}" if se else ""
                cells.append(f"{row.label} ({params}): {mean:.2f}{spread}, {n}")
            else:
                cells.append("—")
        ranked = sorted(best.items(), key=lambda kv: kv[1][0])
        if len(ranked) >= 2:
            (win, (m1, s1, _, _)), (_, (m2, s2, _, _)) = ranked[0], ranked[1]
            se = math.sqrt((s1 or 0) ** 2 + (s2 or 0) ** 2)
            verdict = "resolved" if se and m2 - m1 > 2 * se else "not resolved"
            cells += [f"**{win}**", f"{m2 - m1:.2f} ± {se:.2f}: {verdict}"]
        else:
            cells += [ranked[0][0] if ranked else "—", "only one strategy measured" if ranked else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _baseline_view(spec: Spec, rows: Sequence[Any], runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Table 8's layout from the same runs: each row with a baseline, its accuracy drop and the share of
    the baseline's unique parameters it removes."""
    lines = ["| row | baseline | accuracy drop (points) | parameters removed |", "|---|---|---|---|"]
    found = False
    for row in rows:
        base_id = row.baseline or row.prune.get("source")
        if not base_id or row.id not in runs or base_id not in runs:
            continue
        (ma, sa, _), (mb, sb, _) = _uncertainty(runs[row.id]), _uncertainty(runs[base_id])
        if ma is None or mb is None:
            continue
        p, pb = runs[row.id][0].get("unique_params") or 0, runs[base_id][0].get("unique_params") or 0
        se = math.sqrt((sa or 0) ** 2 + (sb or 0) ** 2)
        removed = 100.0 * (1 - p / pb) if pb else math.nan
        base = spec.row(base_id).label
        lines.append(f"| {row.label} | {base} | {ma - mb:+.2f} ± {se:.2f} | {removed:.1f} % |")
        found = True
    title = "Table 8's layout (accuracy drop against each row's base, from the same runs):"
    return [title, ""] + lines + [""] if found else []


def build_report(results: str | Path = "results", output: str | Path = "docs/results.md",
                 figures: str | Path | None = None, scales: Sequence[str] = ("paper", "cpu"),
                 spec_dir: Path = SPEC_DIR, allow_empty: bool = False) -> Path:
    """Write ``output`` (markdown) and its PNGs (``figures``, default ``<output dir>/figures``).

    A store without a single record at ``scales`` is refused (a mistyped ``--results`` would
    otherwise overwrite the page with an empty one) unless ``allow_empty``.
    """
    store = ResultsStore(Path(results))
    found = [p for scale in scales for p in sorted(store.scale_dir(scale).glob("*.jsonl"))
             if store.records(p.stem, scale)]
    if not found and not allow_empty:
        raise ConfigError(f"no records at {', '.join(scales)} scale in {results}/ (wrong --results or "
                          f"--scales?); {output} is left as it is (--allow-empty writes it anyway)")
    output = Path(output)
    figures = Path(figures) if figures is not None else output.parent / "figures"
    blocks = read_blocks(output)
    specs = load_specs(spec_dir)
    lines = ["# Reproducing the papers", "",
             f"Generated by `dacnn report` from the results store (`{results}`); edit only inside the "
             "`reading` blocks, which regeneration keeps. Re-run with `dacnn reproduce NAME --scale "
             "cpu|paper` then `dacnn report`.", "", "## Summary", ""]
    lines += _block("summary", blocks)
    lines += ["| experiment | what | " + " | ".join(f"{s} runs done" for s in scales) + " |",
              "|---|---|" + "---|" * len(scales)]
    for spec in specs:
        counts = [_runs_done(spec, scale, store) for scale in scales]
        lines.append(f"| [{spec.name}](#{spec.name}) | {spec.title} | " + " | ".join(counts) + " |")
    lines.append("")
    for spec in specs:
        lines += [f'<a id="{spec.name}"></a>', f"## {spec.title}", "", f"Source: {spec.source}.", ""]
        if spec.claim:
            lines += [f"Claim: {spec.claim}", ""]
        if spec.from_spec:
            lines += [f"Drawn from the runs of [{spec.from_spec}](#{spec.from_spec}).", ""]
        for scale in scales:
            lines += _scale_section(spec, scale, store, figures, output.parent)
        lines += ["#### Reading", ""] + _block(spec.name, blocks)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return output
