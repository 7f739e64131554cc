"""The committed results store (``results/``) and ``docs/results.md`` cannot go stale.

Every committed record's cheap fields (unique and per-use parameters, FLOPs) are recomputed from the
current code and must match; no committed record comes from a dirty tree; and ``docs/results.md``
is exactly what ``dacnn report`` writes from ``results/`` now (its figures included by name).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from dacnn.cli import main
from dacnn.counting import count_params
from dacnn.experiments.execute import model_figures
from dacnn.experiments.report import is_dirty
from dacnn.experiments.store import RECORD_FIELDS
from dacnn.registry import create_model
from dacnn.train.config import config_from_dict

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
RECORDS = [(path.stem, i, json.loads(line)) for path in sorted(RESULTS.glob("*.jsonl"))
           for i, line in enumerate(path.read_text().splitlines()) if line.strip()]


@pytest.mark.parametrize(("name", "line", "record"), RECORDS,
                         ids=[f"{n}:{i + 1}:{r.get('row')}" for n, i, r in RECORDS])
def test_committed_record_is_clean_and_its_cheap_fields_hold(name, line, record):
    assert list(record) == list(RECORD_FIELDS), f"results/{name}.jsonl line {line + 1}: an old record format"
    assert not is_dirty(record), f"results/{name}.jsonl line {line + 1} was recorded from a dirty tree"
    assert record["source_hash"] and re.fullmatch(r"[0-9a-f]{40}", record["git_commit"])
    if record["kind"] not in ("train", "filters"):
        return  # prune rows count non-zero weights of a fine-tuned model: not cheap to recompute
    model = create_model(record["model"], **record["model_kwargs"])
    assert count_params(model).unique == record["unique_params"], "unique parameters"
    figures = model_figures(config_from_dict(record["config"]))
    assert figures["per_use_params"] == record["per_use_params"], "per-use parameters"
    assert figures["flops"] == record["flops"], "FLOPs"


def test_docs_results_md_is_what_dacnn_report_writes(tmp_path):
    doc = ROOT / "docs" / "results.md"
    out = tmp_path / "docs" / "results.md"
    out.parent.mkdir()
    shutil.copy(doc, out)  # the reading blocks are carried over from the committed page
    assert main(["report", "--results", str(RESULTS), "--output", str(out), "--allow-empty"]) == 0
    committed = doc.read_text(encoding="utf-8").replace(str(RESULTS), "results")
    written = out.read_text(encoding="utf-8").replace(str(RESULTS), "results")
    assert written == committed, "docs/results.md is stale: run `dacnn report` and commit it"
    made = sorted(p.name for p in (out.parent / "figures").glob("*.png"))
    assert made == sorted(p.name for p in (ROOT / "docs" / "figures").glob("*.png"))
