"""Planning a spec's rows: what to run, with which resolved config, hash and run directory.

:func:`plan` turns a spec at a scale (:class:`RunOptions`) into :class:`PlannedRow` s in run order (a
prune row after the row it prunes), each with its full resolved training config and the config hash
that names it (:func:`~dacnn.experiments.store.config_hash`). The runner (:mod:`.runner`), the
executor of one row (:mod:`.execute`), the campaign and the report all read these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dacnn.errors import ConfigError
from dacnn.experiments.provenance import source_hash
from dacnn.experiments.spec import SPEC_DIR, ResolvedRow, Spec, get_spec, resolve_row, rows_at_scale
from dacnn.experiments.store import config_hash
from dacnn.train.config import resolve_config

__all__ = ["RunOptions", "PlannedRow", "plan"]


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
    partial_records: bool = False  # keep each run's record so far in <results>/partial/ after every epoch
    note: str | None = None  # free text stored in each record's extra.note (e.g. why the epochs differ)
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
    source_seed: int | None = None  # a prune row's: the seed of the source run it prunes
    only_source: bool = False  # planned only as a prune row's source: any code version's record serves

    @property
    def seed(self) -> int | None:
        """The training seed (a prune row: its source's, when the source runs over several)."""
        return self.source_seed if self.row.kind == "prune" else self.train.get("seed")

    @property
    def row(self) -> Any:
        return self.resolved.row

    @property
    def spec(self) -> Spec:
        return self.resolved.spec

    @property
    def run_id(self) -> str:
        """The row id, with ``#seed`` when the row (a prune row: its source) runs over several seeds."""
        several = self.resolved.seeds or (self.row.kind == "prune" and self.source_seed is not None)
        return f"{self.row.id}#{self.seed}" if several else self.row.id

    @property
    def name(self) -> str:
        """``spec/row`` (``spec/row#seed``)."""
        return f"{self.spec.name}/{self.run_id}"


def _runner_settings(rr: ResolvedRow) -> dict[str, Any]:
    settings: dict[str, Any] = {"kind": rr.row.kind, "test_subset": rr.test_subset}
    if rr.row.kind == "filters":
        settings["filters"] = rr.filters
    return settings


def _plan_prune(rr: ResolvedRow, opts: RunOptions, source: PlannedRow) -> PlannedRow:
    """A prune row of one run of its source (the source's config hash names it, so each seed of the
    source gives its own prune run)."""
    runner = {"kind": "prune", "source": source.chash, "test_subset": rr.test_subset,
              **{k: v for k, v in rr.prune.items() if k != "source"}}
    chash = config_hash({}, runner)
    seed = source.seed if source.resolved.seeds else None
    return PlannedRow(rr, {}, runner, chash, _run_dir(opts, f"prune-{chash}"), source_seed=seed)


def _plan_row(rr: ResolvedRow, opts: RunOptions) -> PlannedRow:

    row = rr.row
    if row.kind == "quoted":
        chash = config_hash({}, {"kind": "quoted", "row": row.id})
        return PlannedRow(rr, {}, {"kind": "quoted"}, chash, None)
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
    planned: dict[str, list[PlannedRow]] = {}  # row id -> its runs (a prune row prunes each)
    out: list[PlannedRow] = []
    for row_id in order:
        rr = resolve_row(spec, spec.row(row_id), opts.scale)
        if rr.row.kind == "prune":
            runs = [_plan_prune(rr, opts, source) for source in planned[rr.row.prune["source"]]]
        else:
            variants = [rr] if rr.seeds is None else [replace(rr, train={**rr.train, "seed": s})
                                                      for s in rr.seeds]
            if opts.seeds is not None and rr.seeds is not None:
                kept = [v for v in variants if v.train["seed"] in opts.seeds]
                variants = kept or (variants[:1] if row_id not in wanted else [])  # a prune row's source
            only_source = row_id not in wanted
            runs = [replace(_plan_row(variant, opts), only_source=only_source) for variant in variants]
        planned[row_id] = runs
        out.extend(runs)
    return spec, out
