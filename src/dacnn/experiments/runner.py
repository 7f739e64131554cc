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

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dacnn.errors import ConfigError
from dacnn.experiments.execute import run_prune_row, run_training_row
from dacnn.experiments.spec import SPEC_DIR, ResolvedRow, Spec, get_spec, resolve_row, rows_at_scale
from dacnn.experiments.store import ResultsStore, check_clean, config_hash, source_hash
from dacnn.train.config import resolve_config
from dacnn.train.runlog import format_duration

__all__ = ["RunOptions", "PlannedRow", "plan", "reproduce", "row_status"]


@dataclass
class RunOptions:
    """Where results and runs go, and how to run (see ``dacnn reproduce --help``)."""

    scale: str
    results: Path = Path("results")
    runs_dir: Path = Path("runs/reproduce")
    data_dir: str | None = None
    device: str | None = None
    force: bool = False
    verbose: bool = True
    rows: list[str] | None = None
    threads: int | None = None  # torch intra-op threads (1 is much faster on a loaded CPU)
    resume: bool = False  # continue interrupted runs (else an interrupted run is an error)
    allow_dirty: bool = False  # record from a tree whose src/ has uncommitted changes (marked dirty)
    jobs: int = 1  # training rows run at once, each in its own single-threaded process
    command: str | None = None  # the command line stored in each record
    seeds: list[int] | None = None  # run only these seeds of rows that run over several
    overrides: dict[str, Any] = field(default_factory=dict)  # training settings over the spec's (hashed)
    spec_dir: Path = SPEC_DIR
    say: Any = field(default=print, repr=False)


@dataclass
class PlannedRow:
    """A resolved row with its training config, hash and run directory."""

    resolved: ResolvedRow
    train: dict[str, Any]  # the full resolved TrainConfig as a dict (empty for prune/quoted rows)
    runner: dict[str, Any]
    chash: str
    run_dir: Path | None

    @property
    def row(self) -> Any:
        return self.resolved.row

    @property
    def spec(self) -> Spec:
        return self.resolved.spec

    @property
    def run_id(self) -> str:
        """The row id, with ``#seed`` when the row runs over several seeds."""
        return f"{self.row.id}#{self.train.get('seed')}" if self.resolved.seeds else self.row.id

    @property
    def name(self) -> str:
        """``spec/row`` (``spec/row#seed``)."""
        return f"{self.spec.name}/{self.run_id}"


def _runner_settings(rr: ResolvedRow) -> dict[str, Any]:
    settings: dict[str, Any] = {"kind": rr.row.kind, "test_subset": rr.test_subset}
    if rr.row.kind == "filters":
        settings["filters"] = rr.filters
    return settings


def _plan_row(rr: ResolvedRow, opts: RunOptions, planned: dict[str, PlannedRow]) -> PlannedRow:

    row = rr.row
    if row.kind == "quoted":
        chash = config_hash({}, {"kind": "quoted", "row": row.id})
        return PlannedRow(rr, {}, {"kind": "quoted"}, chash, None)
    if row.kind == "prune":
        source = planned[row.prune["source"]]
        runner = {"kind": "prune", "source": source.chash, "test_subset": rr.test_subset,
                  **{k: v for k, v in rr.prune.items() if k != "source"}}
        chash = config_hash({}, runner)
        return PlannedRow(rr, {}, runner, chash, _run_dir(opts, f"prune-{chash}"))
    if opts.overrides:
        rr = replace(rr, train=_overridden(rr.train, opts.overrides))
    try:
        cfg = resolve_config(rr.train)
    except ConfigError as exc:
        raise ConfigError(f"{rr.spec.path}: row {row.id!r} at {rr.scale} scale: {exc}") from None
    train = cfg.to_dict()
    runner = _runner_settings(rr)
    if rr.test_subset:
        train["eval_test"] = False
    chash = config_hash(train, runner)
    return PlannedRow(rr, train, runner, chash, _run_dir(opts, f"{cfg.model}-{chash}"))


def _overridden(train: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` over ``train``; new epochs without new milestones scale them (as recipes do)."""
    out = {**train, **overrides}
    if "epochs" in overrides and "lr_milestones" not in overrides and train.get("lr_milestones"):
        ratio = int(overrides["epochs"]) / int(train.get("epochs") or overrides["epochs"])
        out["lr_milestones"] = sorted({max(1, int(m * ratio)) for m in train["lr_milestones"]})
    return out


def _run_dir(opts: RunOptions, name: str) -> Path:
    """``<runs>/<scale>/<name>-<source hash>``: only the code that started a run resumes or reads it back."""
    return opts.runs_dir / opts.scale / f"{name}-{source_hash()[:8]}"


def plan(spec: Spec, opts: RunOptions) -> tuple[Spec, list[PlannedRow]]:
    """The rows to consider (``opts.rows`` or all at the scale, plus prune sources), in run order.

    A figure drawn from another spec's runs plans that spec's rows; the returned spec is the one
    whose store file receives the records.
    """
    if spec.from_spec is not None:
        wanted = list(opts.rows or spec.row_ids or [])
        spec = get_spec(spec.from_spec, spec.path.parent)
        if not wanted:
            wanted = [r.id for r in rows_at_scale(spec, opts.scale)]
    else:
        wanted = list(opts.rows) if opts.rows else [r.id for r in rows_at_scale(spec, opts.scale)]
    for row_id in wanted:
        spec.row(row_id)  # raises on an unknown id
    order: list[str] = []

    def add(row_id: str) -> None:
        row = spec.row(row_id)
        dep = row.prune.get("source")
        if dep and dep not in order:
            add(dep)
        if row_id not in order:
            order.append(row_id)

    for row_id in wanted:
        add(row_id)
    first: dict[str, PlannedRow] = {}  # row id -> its first seed's run (a prune row's source)
    out: list[PlannedRow] = []
    for row_id in order:
        rr = resolve_row(spec, spec.row(row_id), opts.scale)
        variants = [rr] if rr.seeds is None else [replace(rr, train={**rr.train, "seed": s})
                                                  for s in rr.seeds]
        if opts.seeds is not None and rr.seeds is not None:
            kept = [v for v in variants if v.train["seed"] in opts.seeds]
            variants = kept or (variants[:1] if row_id not in wanted else [])  # a prune row's source
        for variant in variants:
            p = _plan_row(variant, opts, first)
            first.setdefault(row_id, p)
            out.append(p)
    return spec, out


def row_status(p: PlannedRow, store: ResultsStore) -> str:
    """``done``, ``shared`` (another table has the same run), ``partial`` (resumable), ``missing``,
    or ``quoted``."""
    if p.row.kind == "quoted":
        return "quoted"
    if store.find(p.spec.name, p.row.id, p.resolved.scale, p.chash):
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
        existing = None if opts.force else store.find(spec.name, p.row.id, opts.scale, p.chash)
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
            src = next(q for q in rows if q.row.id == p.row.prune["source"])
            source = store.find(spec.name, src.row.id, opts.scale, src.chash)
            if source is None:
                raise ConfigError(f"{spec.name}/{p.row.id}: its source row {src.row.id!r} has no result")
            record = run_prune_row(p, source, opts)
        else:
            record = run_training_row(p, opts, store)
        store.append(record)
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
