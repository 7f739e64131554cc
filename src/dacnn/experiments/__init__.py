"""Reproducing the papers: experiment specs, a runner, a results store, the report and its plots.

* :mod:`~dacnn.experiments.spec`: one YAML spec per table or figure (``specs/``), three scales each;
* :mod:`~dacnn.experiments.runner`: ``dacnn reproduce`` (runs missing rows, resumable);
* :mod:`~dacnn.experiments.campaign`: ``--jobs N``, several specs in single-threaded processes;
* :mod:`~dacnn.experiments.store`: ``results/<experiment>.jsonl``, one line per finished run, with
  its provenance (commit, source hash, command, machine);
* :mod:`~dacnn.experiments.report`: ``dacnn report`` -> ``docs/results.md`` + ``docs/figures/*.png``.

Layering: this package sits above training, models and data; the CLI (``dacnn.cli.reproduce``) is
a thin layer over it.
"""

from dacnn.experiments.planning import RunOptions, plan
from dacnn.experiments.report import build_report
from dacnn.experiments.runner import reproduce, row_status
from dacnn.experiments.spec import SCALES, Row, Scale, Spec, SpecError, get_spec, load_spec, load_specs
from dacnn.experiments.store import RECORD_FIELDS, ResultsStore, config_hash

__all__ = [
    "RECORD_FIELDS",
    "SCALES",
    "ResultsStore",
    "Row",
    "RunOptions",
    "Scale",
    "Spec",
    "SpecError",
    "build_report",
    "config_hash",
    "get_spec",
    "load_spec",
    "load_specs",
    "plan",
    "reproduce",
    "row_status",
]
