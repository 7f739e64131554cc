"""Experiment specs: one YAML file per table or figure, read into :class:`Spec`.

A spec is data (``specs/<name>.yaml`` beside this file): the rows of a paper's table, each naming
the registered model, the training recipe and overrides, and the paper's numbers for that row; and
the *scales* it runs at (``paper``, ``cpu``, ``smoke``), usually inherited from a shared protocol
in ``specs/protocols.yaml``. :func:`resolve_row` turns (spec, row, scale) into a
:class:`~dacnn.train.config.TrainConfig` plus the runner's own settings; :func:`config_hash` names
that combination so a finished run is never repeated.

Resolution order of training settings: recipe < spec ``defaults`` < row ``train`` < scale ``train``
< row ``scales.<scale>.train``; then the scale's dataset substitutions (CIFAR-100 -> CIFAR-10 at
``cpu`` scale) and width divisor (``width // width_divisor``) are applied. A scale (or a row at a
scale) may list ``seeds``: the row then runs once per seed, and the report gives mean and standard
deviation over them.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from dacnn.errors import ConfigError
from dacnn.train.config import FIELD_NAMES
from dacnn.train.recipes import get_recipe

__all__ = [
    "SCALES",
    "ROW_KINDS",
    "SPEC_DIR",
    "Row",
    "Scale",
    "Spec",
    "ResolvedRow",
    "SpecError",
    "get_spec",
    "load_spec",
    "load_specs",
    "spec_names",
    "resolve_row",
    "rows_at_scale",
]

SCALES = ("paper", "cpu", "smoke")
ROW_KINDS = ("train", "prune", "quoted", "filters")
SPEC_DIR = Path(__file__).with_name("specs")
PROTOCOLS_FILE = "protocols.yaml"

_SPEC_KEYS = {"name", "kind", "title", "source", "claim", "protocol", "metric", "plots", "defaults", "scales",
              "rows", "comparisons", "from", "row_ids", "order", "budgets", "strategies"}
_ROW_KEYS = {"id", "label", "kind", "model", "train", "paper", "group", "x", "scales", "baseline", "prune",
             "filters", "note"}
_SCALE_KEYS = {"note", "datasets", "width_divisor", "train", "test_subset", "rows", "prune", "filters",
               "seeds"}
_ROW_SCALE_KEYS = {"train", "test_subset", "skip", "prune", "filters", "seeds"}
_PAPER_KEYS = {"error", "params_m", "extra_params", "acc_drop", "prune_ratio", "accuracy", "source", "quoted"}
_COMPARISON_KEYS = {"label", "a", "b", "paper_delta"}


class SpecError(ConfigError):
    """A spec file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Scale:
    """How a spec runs at one scale: training overrides, dataset substitutions, width divisor."""

    name: str
    note: str = ""
    datasets: dict[str, str] = field(default_factory=dict)
    width_divisor: int | None = None
    train: dict[str, Any] = field(default_factory=dict)
    test_subset: int | None = None
    rows: tuple[str, ...] | None = None  # the rows run at this scale (None: all)
    prune: dict[str, Any] = field(default_factory=dict)
    filters: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] | None = None  # each row runs once per seed (None: once, with its own seed)


@dataclass(frozen=True)
class Row:
    """One row of a table: what to train and what the paper printed for it."""

    id: str
    label: str
    kind: str = "train"
    model: str | None = None
    train: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, Any] = field(default_factory=dict)
    group: str | None = None
    x: float | None = None  # abscissa for sweep plots (depth, N)
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline: str | None = None  # row whose accuracy this row's drop / compression is measured against
    prune: dict[str, Any] = field(default_factory=dict)  # kind "prune": source row, ratio, scope
    filters: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Spec:
    """A table or figure of a paper. Figures drawn from another spec's runs name it in ``from_spec``."""

    name: str
    title: str
    kind: str
    source: str
    path: Path
    claim: str = ""
    metric: str = "error"
    plots: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    scales: dict[str, Scale] = field(default_factory=dict)
    rows: tuple[Row, ...] = ()
    comparisons: tuple[dict[str, Any], ...] = ()
    from_spec: str | None = None
    row_ids: tuple[str, ...] | None = None  # for figures: the rows of ``from_spec`` they draw
    order: int = 0
    budgets: tuple[tuple[int, int], ...] = ()  # unique-parameter ranges of the which-wins table
    strategies: dict[str, tuple[str, ...]] = field(default_factory=dict)  # strategy -> row groups

    def strategy(self, row: Row) -> str | None:
        """The strategy (e.g. ``sharing``) whose groups hold ``row.group``, if any."""
        return next((name for name, groups in self.strategies.items() if row.group in groups), None)

    def row(self, row_id: str) -> Row:
        for row in self.rows:
            if row.id == row_id:
                return row
        close = difflib.get_close_matches(row_id, [r.id for r in self.rows], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise SpecError(f"{self.path}: no row {row_id!r} in {self.name}{hint} "
                        f"(rows: {', '.join(r.id for r in self.rows)})")


@dataclass(frozen=True)
class ResolvedRow:
    """A row at a scale: the training config (a dict of TrainConfig keys) and runner settings."""

    spec: Spec
    row: Row
    scale: str
    train: dict[str, Any]
    test_subset: int | None
    prune: dict[str, Any]
    filters: dict[str, Any]
    seeds: tuple[int, ...] | None = None


def _check_keys(data: dict[str, Any], allowed: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise SpecError(f"{where}: unknown key {key!r}{hint}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(f"cannot read spec {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    return data


@cache
def _protocols(spec_dir: Path) -> dict[str, Any]:
    path = spec_dir / PROTOCOLS_FILE
    return _read_yaml(path) if path.is_file() else {}


def _merge_scale(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``; ``train``/``datasets``/``prune``/``filters`` merge key by key and a
    spec's ``note`` is appended to the protocol's."""
    merged = copy.deepcopy(base)
    for key, value in (over or {}).items():
        if key == "note" and merged.get("note"):
            merged["note"] = f"{str(merged['note']).strip()} {str(value).strip()}"
        elif key in ("train", "datasets", "prune", "filters") and isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def _parse_scale(name: str, data: dict[str, Any], where: str) -> Scale:
    _check_keys(data, _SCALE_KEYS, where)
    rows = data.get("rows")
    divisor = data.get("width_divisor")
    if divisor is not None and (not isinstance(divisor, int) or divisor < 1):
        raise SpecError(f"{where}: width_divisor must be a positive integer, got {divisor!r}")
    seeds = _parse_seeds(data.get("seeds"), where)
    return Scale(
        name=name, note=str(data.get("note", "")).strip(), datasets=dict(data.get("datasets") or {}),
        width_divisor=divisor, train=dict(data.get("train") or {}), test_subset=data.get("test_subset"),
        rows=tuple(rows) if rows is not None else None, prune=dict(data.get("prune") or {}),
        filters=dict(data.get("filters") or {}), seeds=seeds,
    )


def _parse_seeds(value: Any, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or not value or len(set(value)) != len(value)
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise SpecError(f"{where}: seeds must be a non-empty list of distinct integers, got {value!r}")
    return tuple(value)


def _parse_row(data: dict[str, Any], where: str) -> Row:
    _check_keys(data, _ROW_KEYS, where)
    if "id" not in data:
        raise SpecError(f"{where}: a row needs an 'id'")
    where = f"{where} (row {data['id']!r})"
    kind = data.get("kind", "train")
    if kind not in ROW_KINDS:
        raise SpecError(f"{where}: kind must be one of {', '.join(ROW_KINDS)}, got {kind!r}")
    if kind in ("train", "filters") and not data.get("model"):
        raise SpecError(f"{where}: a {kind} row needs a 'model'")
    if kind == "prune" and not {"source", "ratio"} <= set(data.get("prune") or {}):
        raise SpecError(f"{where}: a prune row needs prune.source (a row id) and prune.ratio")
    paper = dict(data.get("paper") or {})
    _check_keys(paper, _PAPER_KEYS, f"{where}: paper")
    for scale, over in (data.get("scales") or {}).items():
        if scale not in SCALES:
            raise SpecError(f"{where}: unknown scale {scale!r} (scales: {', '.join(SCALES)})")
        _check_keys(over, _ROW_SCALE_KEYS, f"{where}: scales.{scale}")
        _parse_seeds(over.get("seeds"), f"{where}: scales.{scale}")
    return Row(
        id=str(data["id"]), label=str(data.get("label", data["id"])), kind=kind, model=data.get("model"),
        train=dict(data.get("train") or {}), paper=paper, group=data.get("group"), x=data.get("x"),
        scales=dict(data.get("scales") or {}), baseline=data.get("baseline"),
        prune=dict(data.get("prune") or {}), filters=dict(data.get("filters") or {}),
        note=str(data.get("note", "")).strip(),
    )


def load_spec(path: str | Path) -> Spec:
    """Read and check one spec file (unknown keys, row references and TrainConfig keys)."""
    path = Path(path)
    data = _read_yaml(path)
    _check_keys(data, _SPEC_KEYS, str(path))
    for key in ("name", "title", "kind"):
        if key not in data:
            raise SpecError(f"{path}: missing {key!r}")
    protocol_name = data.get("protocol")
    protocols = _protocols(path.parent)
    base_scales: dict[str, Any] = {}
    if protocol_name is not None:
        if protocol_name not in protocols:
            raise SpecError(f"{path}: field 'protocol': unknown protocol {protocol_name!r} "
                            f"(in {path.parent / PROTOCOLS_FILE}: {', '.join(protocols) or 'none'})")
        base_scales = protocols[protocol_name]
    own_scales = data.get("scales") or {}
    scales = {}
    for scale in SCALES:
        if scale in base_scales or scale in own_scales:
            merged = _merge_scale(base_scales.get(scale) or {}, own_scales.get(scale) or {})
            scales[scale] = _parse_scale(scale, merged, f"{path}: scales.{scale}")
    for scale in own_scales:
        if scale not in SCALES:
            raise SpecError(f"{path}: unknown scale {scale!r} (scales: {', '.join(SCALES)})")
    rows = tuple(_parse_row(r, f"{path}: rows[{i}]") for i, r in enumerate(data.get("rows") or []))
    ids = [r.id for r in rows]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise SpecError(f"{path}: duplicate row ids {dupes}")
    spec = Spec(
        name=str(data["name"]), title=str(data["title"]), kind=str(data["kind"]),
        source=str(data.get("source", "")), path=path, claim=str(data.get("claim", "")).strip(),
        metric=str(data.get("metric", "error")), plots=tuple(data.get("plots") or ()),
        defaults=dict(data.get("defaults") or {}), scales=scales, rows=rows,
        comparisons=tuple(data.get("comparisons") or ()), from_spec=data.get("from"),
        row_ids=tuple(data["row_ids"]) if data.get("row_ids") else None, order=int(data.get("order", 0)),
        budgets=_parse_budgets(data.get("budgets"), path),
        strategies={str(k): tuple(v) for k, v in (data.get("strategies") or {}).items()},
    )
    _validate_references(spec)
    return spec


def _parse_budgets(value: Any, path: Path) -> tuple[tuple[int, int], ...]:
    if value is None:
        return ()
    ok = isinstance(value, list) and all(isinstance(b, list) and len(b) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) for x in b) and b[0] <= b[1] for b in value)
    if not ok:
        raise SpecError(f"{path}: budgets must be a list of [low, high] parameter counts, got {value!r}")
    return tuple((b[0], b[1]) for b in value)


def _validate_references(spec: Spec) -> None:

    where = str(spec.path)
    for key in spec.defaults:
        if key not in FIELD_NAMES:
            raise SpecError(f"{where}: defaults: {key!r} is not a training setting")
    ids = {r.id for r in spec.rows}
    for scale in spec.scales.values():
        for key in scale.train:
            if key not in FIELD_NAMES:
                raise SpecError(f"{where}: scales.{scale.name}.train: {key!r} is not a training setting")
        for row_id in scale.rows or ():
            if row_id not in ids:
                raise SpecError(f"{where}: scales.{scale.name}.rows names unknown row {row_id!r}")
    for row in spec.rows:
        for key in list(row.train) + [k for s in row.scales.values() for k in (s.get("train") or {})]:
            if key not in FIELD_NAMES:
                raise SpecError(f"{where}: row {row.id!r}: {key!r} is not a training setting")
        for ref in (row.baseline, row.prune.get("source")):
            if ref is not None and ref not in ids:
                raise SpecError(f"{where}: row {row.id!r} refers to unknown row {ref!r}")
    for i, comp in enumerate(spec.comparisons):
        _check_keys(comp, _COMPARISON_KEYS, f"{where}: comparisons[{i}]")
        for side in ("a", "b"):
            if comp.get(side) not in ids:
                raise SpecError(f"{where}: comparisons[{i}].{side}: unknown row {comp.get(side)!r}")


def spec_names(spec_dir: Path = SPEC_DIR) -> list[str]:
    """Names of the spec files in ``spec_dir``, in report order."""
    return [s.name for s in load_specs(spec_dir)]


@cache
def _load_all(spec_dir: Path) -> tuple[Spec, ...]:
    specs = [load_spec(p) for p in sorted(spec_dir.glob("*.yaml")) if p.name != PROTOCOLS_FILE]
    by_name = {s.name: s for s in specs}
    for spec in specs:
        if spec.from_spec is not None:
            if spec.from_spec not in by_name:
                raise SpecError(f"{spec.path}: field 'from': unknown spec {spec.from_spec!r}")
            source = by_name[spec.from_spec]
            for row_id in spec.row_ids or ():
                source.row(row_id)
    return tuple(sorted(specs, key=lambda s: (s.order, s.name)))


def load_specs(spec_dir: Path = SPEC_DIR) -> list[Spec]:
    """Every spec in ``spec_dir`` (checked, cross-references included), sorted for the report."""
    return list(_load_all(Path(spec_dir)))


def get_spec(name: str, spec_dir: Path = SPEC_DIR) -> Spec:
    """The spec called ``name``; an unknown name raises :class:`SpecError` listing the known ones."""
    specs = {s.name: s for s in load_specs(spec_dir)}
    if name not in specs:
        close = difflib.get_close_matches(name, specs, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise SpecError(f"unknown experiment {name!r}{hint} (known: {', '.join(specs)})")
    return specs[name]


def rows_at_scale(spec: Spec, scale: str) -> list[Row]:
    """The rows a spec runs at ``scale`` (a scale may thin them; a row may skip a scale)."""
    sc = spec.scales.get(scale)
    keep = set(sc.rows) if sc is not None and sc.rows is not None else None
    return [r for r in spec.rows
            if (keep is None or r.id in keep) and not (r.scales.get(scale) or {}).get("skip")]


def resolve_row(spec: Spec, row: Row, scale: str) -> ResolvedRow:
    """Training settings and runner settings of ``row`` at ``scale`` (see the module docstring)."""
    if scale not in spec.scales:
        raise SpecError(f"{spec.path}: {spec.name} has no {scale!r} scale "
                        f"(has: {', '.join(spec.scales) or 'none'})")
    sc = spec.scales[scale]
    over = row.scales.get(scale) or {}
    train: dict[str, Any] = {**spec.defaults, **row.train}
    if row.model is not None:
        train["model"] = row.model
    if sc.width_divisor and train.get("width"):
        train["width"] = max(1, int(train["width"]) // sc.width_divisor)
    train.update(sc.train)
    train.update(over.get("train") or {})
    dataset = train.get("dataset")
    if dataset is None and train.get("recipe"):

        dataset = get_recipe(train["recipe"]).settings.get("dataset")
    if dataset in sc.datasets:
        train["dataset"] = sc.datasets[dataset]
    test_subset = over.get("test_subset", sc.test_subset)
    seeds = tuple(over["seeds"]) if over.get("seeds") else sc.seeds
    return ResolvedRow(spec, row, scale, train, test_subset,
                       {**sc.prune, **row.prune, **(over.get("prune") or {})},
                       {**sc.filters, **row.filters, **(over.get("filters") or {})},
                       seeds if row.kind in ("train", "filters") else None)
