"""Run the rows of a spec at a scale, skipping those already in the results store.

``dacnn reproduce table2 --scale cpu`` calls :func:`reproduce`. Each row is resolved to a training
config (:func:`~dacnn.experiments.spec.resolve_row`) and hashed; a row whose hash already has a
record for this code version is skipped (and a run shared with another table is copied, not
re-trained). Run directories are content-addressed (``runs/reproduce/<scale>/<model>-<hash>``), so
a killed ``reproduce`` re-run resumes the interrupted row from its last checkpoint and goes on.

Row kinds: ``train`` (one training run), ``filters`` (a training run, then Figure 7's activation
maximisation stored under ``results/artifacts/``), ``prune`` (magnitude pruning + fine-tuning of
another row's trained model, Table 8), ``quoted`` (the paper's number only: nothing runs).
"""

from __future__ import annotations

from typing import Any

from dacnn.errors import ConfigError
from dacnn.experiments.execute import run_prune_row, run_training_row
from dacnn.experiments.planning import PlannedRow, RunOptions, plan
from dacnn.experiments.provenance import check_clean
from dacnn.experiments.spec import get_spec
from dacnn.experiments.store import ResultsStore
from dacnn.train.runlog import format_duration

__all__ = ["RunOptions", "PlannedRow", "plan", "reproduce", "row_status"]


def row_status(p: PlannedRow, store: ResultsStore) -> str:
    """``done``, ``shared`` (another table has the same run), ``partial`` (resumable), ``missing``,
    or ``quoted``."""
    if p.row.kind == "quoted":
        return "quoted"
    if store.find(p.spec.name, p.row.id, p.resolved.scale, p.chash, any_source=p.only_source):
        return "done"
    if store.find_any(p.resolved.scale, p.chash):
        return "shared"
    if p.run_dir is not None and (p.run_dir / "checkpoints" / "last.json").is_file():
        return "partial"
    return "missing"


def reproduce(name: str, opts: RunOptions, *, dry_run: bool = False) -> list[dict[str, Any]]:
    """Run the missing rows of experiment ``name`` at ``opts.scale``; returns the records written.

    With ``dry_run`` nothing runs: each row's status, hash and protocol are printed. At paper and
    cpu scale a tree whose ``src/`` has uncommitted changes is refused unless ``opts.allow_dirty``.
    """
    spec, rows = plan(get_spec(name, opts.spec_dir), opts)
    store = ResultsStore(opts.results)
    if not dry_run and opts.scale != "smoke":  # smoke records (results/smoke/, ignored) are only marked
        check_clean(opts.allow_dirty)
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    say = opts.say
    written: list[dict[str, Any]] = []
    todo = [p for p in rows if p.row.kind != "quoted"]
    say(f"{spec.name} ({spec.title}) at {opts.scale} scale: {len(todo)} rows to check"
        + (f"; {len(rows) - len(todo)} quoted from the paper" if len(rows) > len(todo) else ""))
    for i, p in enumerate(todo, start=1):
        head = f"[{i}/{len(todo)}] {p.name}"
        existing = None if opts.force else store.find(spec.name, p.row.id, opts.scale, p.chash,
                                                      any_source=p.only_source)
        if existing is not None:
            say(f"{head}: done ({_summary(existing)}), skipped")
            continue
        shared = None if opts.force else store.find_any(opts.scale, p.chash)
        if dry_run:
            status = (f"shared with {shared['experiment']}/{shared['row']}" if shared
                      else row_status(p, store))
            say(f"{head}: {status} | hash {p.chash} | {_protocol_line(p)}")
            continue
        if shared is not None:
            record = {**shared, "experiment": spec.name, "row": p.row.id, "label": p.row.label,
                      "reused_from": f"{shared['experiment']}/{shared['row']}"}
            store.append(record)
            written.append(record)
            say(f"{head}: same run as {record['reused_from']} ({_summary(record)}), copied")
            continue
        say(f"{head}: running | {_protocol_line(p)} -> {p.run_dir}")
        if p.row.kind == "prune":
            src = next(q for q in rows if q.row.id == p.row.prune["source"] and q.chash == p.runner["source"])
            # the source's trained model, whichever code version trained it (its record says which)
            source = store.find(spec.name, src.row.id, opts.scale, src.chash, any_source=True)
            if source is None:
                raise ConfigError(f"{spec.name}/{p.row.id}: its source row {src.name.split('/', 1)[1]!r} "
                                  "has no result")
            record = run_prune_row(p, source, opts)
        else:
            record = run_training_row(p, opts, store)
        store.append(record)
        if opts.partial_records and p.row.kind != "prune":
            store.write_partial(record, drop=True)  # the full record supersedes it
        written.append(record)
        say(f"{head}: finished ({_summary(record)})")
    return written


def _summary(record: dict[str, Any]) -> str:

    err = record.get("test_error")
    parts = [f"test error {err:.2f} %" if err is not None else "no test error",
             f"{record.get('unique_params') or 0:,} params"]
    if record.get("wall_time"):
        parts.append(format_duration(record["wall_time"]))
    return ", ".join(parts)


def _protocol_line(p: PlannedRow) -> str:
    if p.row.kind == "prune":
        r = p.runner
        return f"prune {p.row.prune['source']} ratio {r['ratio']} + {r.get('epochs', 0)} fine-tuning epochs"
    t = p.train
    data = f"{t['dataset']} {t['train_subset'] or 'all'} images"
    width = f" width {t['width']}" if t.get("width") else ""
    extra = f" {t['model_kwargs']}" if t.get("model_kwargs") else ""
    return f"{t['model']}{width}{extra} on {data} x {t['epochs']} epochs (recipe {t.get('recipe')})"
