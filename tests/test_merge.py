"""``dacnn results merge DIR`` (:mod:`dacnn.experiments.merge`): a GPU run's records land in ``results/``.

A fake GPU output folder (what ``scripts/gpu-campaign`` leaves in ``$OUT``: ``results/table7.jsonl``
and ``results/partial/table7.jsonl``) is merged into a temporary copy of the committed store, and the
report is regenerated from it; records that cannot be traced to a clean commit are refused whole.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from dacnn.cli import main
from dacnn.experiments.merge import source_hash_at
from dacnn.experiments.provenance import source_files, source_hash
from dacnn.experiments.store import RECORD_FIELDS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def head() -> tuple[str, str]:
    """HEAD's commit and the source hash of the package at it."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    at = source_hash_at(commit, ROOT)
    assert at is not None
    return commit, at


def _record(row: str, commit: str, src: str, **changes) -> dict:
    base = json.loads((ROOT / "results" / "table7.jsonl").read_text().splitlines()[0])
    record = {**base, "row": row, "scale": "paper", "git_commit": commit, "source_hash": src, "dirty": None,
              "finished": "2027-01-02T03:04:05Z", "device": "cuda: NVIDIA H200", "epochs": 12,
              "command": f"dacnn reproduce table7 --scale paper --rows {row} --override epochs=12",
              "extra": {"note": "the paper's 90 epochs scaled to 12"}}
    record.update(changes)
    return {k: record[k] for k in RECORD_FIELDS}


def _gpu_out(tmp: Path, full: list[dict], partial: list[dict] = ()) -> Path:
    out = tmp / "gpu-out"
    (out / "results" / "partial").mkdir(parents=True, exist_ok=True)
    (out / "results" / "table7.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full))
    if partial:
        text = "".join(json.dumps(r) + "\n" for r in partial)
        (out / "results" / "partial" / "table7.jsonl").write_text(text)
    (out / "gpu-campaign.log").write_text("done\n")
    return out


@pytest.fixture
def store(tmp_path) -> Path:
    """A copy of the committed ``results/`` and ``docs/results.md`` (its reading blocks)."""
    shutil.copytree(ROOT / "results", tmp_path / "results")
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "results.md", tmp_path / "docs" / "results.md")
    return tmp_path


def _merge(store: Path, source: Path, *extra: str) -> int:
    return main(["results", "merge", str(source), "--results", str(store / "results"),
                 "--output", str(store / "docs" / "results.md"), *extra])


@pytest.mark.integration
def test_source_hash_at_a_commit_is_the_hash_of_that_tree(head):
    commit, at = head
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True).stdout.strip()
    if not dirty:
        assert at == source_hash()
    assert len(source_files()) > 10
    assert source_hash_at("0" * 40, ROOT) is None


@pytest.mark.integration
def test_a_gpu_output_folder_merges_and_the_report_is_regenerated(store, head, tmp_path, capsys):
    commit, src = head
    before = {p.name: p.read_text() for p in (store / "results").glob("*.jsonl")}
    full = _record("c10-resnet18", commit, src, test_acc=90.5, test_error=9.5)
    partial = _record("c10-mix18-reg", commit, src, test_acc=None, test_error=None, best_epoch=3,
                      extra={"partial": {"epochs_done": 4, "epochs": 12}})
    superseded = _record("c10-resnet18", commit, src, test_acc=None, test_error=None,
                         extra={"partial": {"epochs_done": 11, "epochs": 12}},
                         finished="2027-01-02T03:00:00Z")
    out = _gpu_out(tmp_path, [full], [partial, superseded])
    assert _merge(store, out) == 0
    printed = capsys.readouterr().out
    assert "merged 2 records (1 of runs stopped mid-way); 1 already" in printed and "wrote" in printed
    lines = (store / "results" / "table7.jsonl").read_text().splitlines()
    assert "\n".join(lines[:-2]) + "\n" == before["table7.jsonl"]  # appended, nothing rewritten
    assert [json.loads(line)["row"] for line in lines[-2:]] == ["c10-resnet18", "c10-mix18-reg"]
    assert {p.name: p.read_text() for p in (store / "results").glob("*.jsonl") if p.name != "table7.jsonl"} \
        == {k: v for k, v in before.items() if k != "table7.jsonl"}
    report = (store / "docs" / "results.md").read_text()
    paper = report[report.index('<a id="table7">'):]
    paper = paper[paper.index("### paper scale"):paper.index("### cpu scale")]
    assert "CIFAR-10: ResNet-18 §" in paper and "9.50" in paper
    assert "CIFAR-10: DACNN-18 (MIX, REG) § (partial)" in paper and "4 of 12" in paper
    assert "§ run with `--override` settings" in paper
    assert _merge(store, out, "--no-report") == 0  # twice: nothing new
    assert "merged 0 records; 3 already" in capsys.readouterr().out
    assert len((store / "results" / "table7.jsonl").read_text().splitlines()) == len(lines)


@pytest.mark.integration
@pytest.mark.parametrize(("change", "field"), [
    ({"dirty": {"diff_sha256": "ab" * 32}}, "dirty"),
    ({"git_commit": "unknown"}, "git_commit"),
    ({"git_commit": "1" * 40}, "git_commit"),
    ({"source_hash": "0123456789abcdef"}, "source_hash"),
    ({"scale": "smoke"}, "scale"),
    ({"row": "c10-resnet19"}, "row"),
])
def test_a_record_that_cannot_be_traced_refuses_the_whole_merge(store, head, tmp_path, capsys, change, field):
    commit, src = head
    good = _record("c10-resnet34", commit, src)
    out = _gpu_out(tmp_path, [good, _record(change.pop("row", "c10-resnet18"), commit, src, **change)])
    before = (store / "results" / "table7.jsonl").read_text()
    report = (store / "docs" / "results.md").read_text()
    assert _merge(store, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{out / 'results' / 'table7.jsonl'} line 2: field {field!r}" in err
    assert (store / "results" / "table7.jsonl").read_text() == before  # not even the good record
    assert (store / "docs" / "results.md").read_text() == report


def test_a_folder_without_records_and_a_broken_line_are_clear_errors(store, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _merge(store, tmp_path / "empty") == 2
    assert "no records" in capsys.readouterr().err
    out = _gpu_out(tmp_path, [])
    (out / "results" / "table7.jsonl").write_text('{"experiment": "table7", "row"\n')
    assert _merge(store, out) == 2
    assert "table7.jsonl line 1: not JSON" in capsys.readouterr().err
