"""``dacnn reproduce``: every spec runs end to end at smoke scale; finished rows are skipped; runs resume.

Data: tiny random datasets in the official formats (:mod:`dacnn.data.synthetic`) in a temporary
data directory, so the tests need no real data and learn nothing; they check the pipeline. Each
default test runs a few cheap rows per spec; ``-m slow`` runs every row of every spec.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dacnn.cli import main
from dacnn.counting import count_params
from dacnn.experiments import RECORD_FIELDS, ResultsStore, RunOptions, get_spec, load_specs, plan
from dacnn.experiments.provenance import source_hash
from dacnn.experiments.spec import SCALES, SpecError, load_spec, rows_at_scale
from dacnn.experiments.store import config_hash
from dacnn.registry import create_model, model_info

# Cheap rows that still exercise every spec (and every row kind: train, prune, quoted, filters).
CHEAP_ROWS = {
    "table1": "dacnn14-nobn,dacnn14-bn",
    "table2": "d3-shared,d3-free",
    "table3": "mix14",
    "table4": "section3",
    "table5": "reg18",
    "table6": "dacnn14-mix",
    "table7": "svhn-mix18-reg",
    "table8": "sm-27",
    "figure4": "dacnn34-reg",
    "figure5": "vgg",
    "figure6": "c10-mix18-reg",
    "figure7": "dacnn5",
    "lrunet_sweep": "n1,n2",
    "kernel_sharing": "seresnet-c10-shared",
    "paper_recipe": "dacnn14-plain",
    "pretrained": "svhn-dacnn14",
    "frontier": "dacnn18-reg-w8,resnet18-w16-pruned-mix",
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """CIFAR-10 and Fashion-MNIST stand-ins: 320 training and 128 test images of random pixels."""
    from dacnn.data.synthetic import write_cifar, write_fashion_mnist

    root = tmp_path_factory.mktemp("data")
    write_cifar(root / "cifar10", "cifar10", n_train=320, n_test=128)
    write_fashion_mnist(root / "fashion_mnist", "train", n=320)
    write_fashion_mnist(root / "fashion_mnist", "test", n=128, seed=1)
    return str(root)


@pytest.fixture(autouse=True)
def quiet_machine(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """A private decoded-array cache (the thread count is set in conftest.py)."""
    monkeypatch.setenv("DACNN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def reproduce(tmp: Path, data_dir: str, *args: str) -> int:
    return main(["reproduce", *args, "--results", str(tmp / "results"), "--runs-dir", str(tmp / "runs"),
                 "--data-dir", data_dir, "--quiet"])


def test_cheap_rows_cover_every_spec():
    assert set(CHEAP_ROWS) == {s.name for s in load_specs()}


@pytest.mark.parametrize("scale", SCALES)
def test_every_spec_resolves_at_every_scale(scale):
    for spec in load_specs():
        target, planned = plan(spec, RunOptions(scale=scale))
        assert planned, f"{spec.name} plans no rows at {scale} scale"
        for p in planned:
            if p.row.kind in ("train", "filters"):
                model_info(p.train["model"])  # registered
                if scale == "smoke":  # and accepts its arguments
                    with torch.device("meta"):
                        create_model(p.train["model"], **p.train["model_kwargs"])
                assert p.train["dataset"] in ("cifar10", "fashion_mnist") or scale == "paper"
        if scale == "paper" and spec.from_spec is None:
            hashes = [p.chash for p in planned]
            assert len(set(hashes)) == len(hashes), f"{spec.name}: two rows are the same run"


@pytest.mark.parametrize("name", sorted(CHEAP_ROWS))
def test_smoke_runs_every_spec(name, tmp_path, data_dir, capsys):
    assert reproduce(tmp_path, data_dir, name, "--scale", "smoke", "--rows", CHEAP_ROWS[name]) == 0
    spec = get_spec(name)
    target = get_spec(spec.from_spec) if spec.from_spec else spec
    store = ResultsStore(tmp_path / "results")
    records = store.latest(target.name, "smoke")
    for row_id in CHEAP_ROWS[name].split(","):
        record = records[row_id]
        assert 0.0 <= record["test_acc"] <= 100.0
        assert record["test_error"] == pytest.approx(100.0 - record["test_acc"])
    assert not (tmp_path / "results" / f"{target.name}.jsonl").exists()  # smoke never touches the store
    assert "finished" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", [s.name for s in load_specs() if s.from_spec is None])
def test_smoke_runs_every_row(name, tmp_path, data_dir):
    assert reproduce(tmp_path, data_dir, name, "--scale", "smoke") == 0
    spec = get_spec(name)
    records = ResultsStore(tmp_path / "results").latest(name, "smoke")
    assert {r.id for r in rows_at_scale(spec, "smoke") if r.kind != "quoted"} <= set(records)


def test_record_holds_every_field(tmp_path, data_dir):
    assert reproduce(tmp_path, data_dir, "table2", "--scale", "smoke", "--rows", "d5-shared") == 0
    [record] = ResultsStore(tmp_path / "results").records("table2", "smoke")
    assert list(record) == list(RECORD_FIELDS)
    _, planned = plan(get_spec("table2"), RunOptions(scale="smoke", rows=["d5-shared"]))
    assert record["config_hash"] == planned[0].chash
    assert record["model"] == "dacnn" and record["dataset"] == "cifar10" and record["epochs"] == 1
    assert record["train_images"] == 256 and record["val_images"] == 64 and record["test_images"] == 128
    model = create_model("dacnn", **record["model_kwargs"])
    counts = count_params(model)
    assert record["unique_params"] == counts.unique
    assert record["per_use_params"] == counts.per_use > counts.unique  # 3 uses of one kernel
    assert record["flops"] > 0 and record["wall_time"] > 0
    assert len(record["dataset_checksum"]) == 16 and record["git_commit"]
    assert record["device"].startswith("cpu")
    assert record["source_hash"] == source_hash() and record["seed"] == 0
    assert record["machine"]["cpu"] and record["machine"]["threads"] >= 1 and record["torch_version"]
    assert record["command"].startswith("dacnn reproduce table2 --scale smoke --rows d5-shared")
    assert [c["epoch"] for c in record["curve"]] == [0]
    assert record["curve"][0]["val_acc"] is not None
    assert Path(record["run_dir"], "checkpoints", "best.json").is_file()
    assert "data_dir" not in record["config"]


def test_finished_rows_are_skipped_and_force_reruns(tmp_path, data_dir, capsys):
    args = ("table1", "--scale", "smoke", "--rows", "dacnn14-bn")
    store_file = tmp_path / "results" / "smoke" / "table1.jsonl"
    assert reproduce(tmp_path, data_dir, *args) == 0
    assert len(store_file.read_text().splitlines()) == 1
    capsys.readouterr()
    assert reproduce(tmp_path, data_dir, *args) == 0
    assert "skipped" in capsys.readouterr().out
    assert len(store_file.read_text().splitlines()) == 1
    assert reproduce(tmp_path, data_dir, *args, "--force") == 0
    assert len(store_file.read_text().splitlines()) == 2


def test_a_run_shared_by_two_tables_is_copied_not_retrained(tmp_path, data_dir, capsys):
    assert reproduce(tmp_path, data_dir, "table1", "--scale", "smoke", "--rows", "dacnn14-bn") == 0
    capsys.readouterr()
    assert reproduce(tmp_path, data_dir, "table6", "--scale", "smoke", "--rows", "dacnn14") == 0
    assert "copied" in capsys.readouterr().out
    [copy] = ResultsStore(tmp_path / "results").records("table6", "smoke")
    [original] = ResultsStore(tmp_path / "results").records("table1", "smoke")
    assert copy["reused_from"] == "table1/dacnn14-bn" and copy["row"] == "dacnn14"
    assert copy["test_acc"] == original["test_acc"] and copy["config_hash"] == original["config_hash"]


def test_killed_reproduce_resumes_the_row(tmp_path, data_dir, capsys):
    """A kill after the last checkpoint but before the record: the re-run resumes, not restarts."""
    args = ("table2", "--scale", "smoke", "--rows", "d3-shared")
    assert reproduce(tmp_path, data_dir, *args) == 0
    store_file = tmp_path / "results" / "smoke" / "table2.jsonl"
    [record] = [json.loads(line) for line in store_file.read_text().splitlines()]
    run_dir = Path(record["run_dir"])
    store_file.write_text('{"experiment": "table2", "row": "d3-sh')  # a line cut by the kill
    (run_dir / "result.json").unlink()
    capsys.readouterr()
    assert reproduce(tmp_path, data_dir, *args) == 2  # an interrupted run is never silently continued
    assert "--resume" in capsys.readouterr().err
    assert reproduce(tmp_path, data_dir, *args, "--resume") == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "finished" in out
    [again] = ResultsStore(tmp_path / "results").records("table2", "smoke")
    assert again["test_acc"] == pytest.approx(record["test_acc"])
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1


def test_config_hash_ignores_where_but_not_what():
    base = {"model": "dacnn", "epochs": 3, "data_dir": "/a", "out_dir": "runs"}
    runner = {"kind": "train", "test_subset": 100}
    same = config_hash({**base, "data_dir": "/b", "out_dir": "elsewhere"}, runner)
    assert config_hash(base, runner) == same
    assert config_hash({**base, "epochs": 4}, runner) != same
    assert config_hash(base, {**runner, "test_subset": 200}) != same
    assert config_hash({**base, "threads": 1, "new_setting": None}, runner) == same


def test_diverged_training_is_a_recorded_result(tmp_path, data_dir, capsys):
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    (spec_dir / "blowup.yaml").write_text(
        "name: blowup\ntitle: Diverges\nkind: table\n"
        "scales: {smoke: {train: {train_subset: 64, val_size: 32, epochs: 2, batch_size: 32}}}\n"
        "rows:\n  - {id: nobn, model: dacnn, paper: {error: 99.0},\n"
        "     train: {dataset: cifar10, depth: 5, width: 8, lr: 1.0e+12, model_kwargs: {batchnorm: false}}}\n"
    )
    assert main(["reproduce", "blowup", "--scale", "smoke", "--spec-dir", str(spec_dir), "--results",
                 str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs"), "--data-dir", data_dir,
                 "--quiet"]) == 0
    [record] = ResultsStore(tmp_path / "results").records("blowup", "smoke")
    assert "loss became" in record["extra"]["diverged"]
    assert "diverged" in capsys.readouterr().out


def test_bad_spec_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    head = "name: bad\ntitle: Bad\nkind: table\nrows:\n"
    path.write_text(head + "  - {id: a, model: dacnn, trian: {epochs: 1}}\n")
    with pytest.raises(SpecError, match=r"bad\.yaml.*'trian'.*did you mean train"):
        load_spec(path)
    path.write_text(head + "  - {id: a, model: dacnn, train: {epoch: 1}}\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: row 'a': 'epoch' is not a training setting"):
        load_spec(path)


def test_list_and_dry_run_write_nothing(tmp_path, data_dir, capsys):
    assert reproduce(tmp_path, data_dir, "--list") == 0
    out = capsys.readouterr().out
    assert all(name in out for name in CHEAP_ROWS)
    assert reproduce(tmp_path, data_dir, "table4", "--scale", "cpu", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "section3#2: missing | hash" in out and "dacnn18_reg width 32" in out
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()
    assert main(["reproduce", "table9", "--scale", "cpu"]) == 2
    assert "unknown experiment 'table9'" in capsys.readouterr().err


def test_store_skips_a_truncated_last_line(tmp_path):
    store = ResultsStore(tmp_path)
    record = {k: None for k in RECORD_FIELDS} | {"experiment": "t", "row": "a", "scale": "cpu", "extra": {}}
    store.append(record)
    with open(store.path("t", "cpu"), "a") as f:
        f.write('{"experiment": "t", "ro')
    assert [r["row"] for r in store.records("t", "cpu")] == ["a"]
    with pytest.raises(ValueError, match="lacks"):
        store.append({"experiment": "t"})


SEEDED_SPEC = """
name: seeded
kind: table
title: "two rows over two seeds"
source: "a test"
protocol: dacnn
defaults: {recipe: dacnn-cifar100}
scales:
  smoke: {seeds: [0, 1]}
rows:
  - {id: shared, label: shared, model: dacnn, train: {width: 128, depth: 3}, paper: {error: 50.0}}
  - {id: free, label: free, model: dacnn, train: {width: 128, depth: 3, model_kwargs: {shared: false}}}
comparisons:
  - {label: sharing, a: free, b: shared}
"""


@pytest.mark.integration
def test_jobs_run_every_seed_in_single_threaded_processes(tmp_path, data_dir, capsys):
    import shutil

    from dacnn.experiments.spec import SPEC_DIR

    specs = tmp_path / "specs"
    specs.mkdir()
    shutil.copy(SPEC_DIR / "protocols.yaml", specs)
    (specs / "seeded.yaml").write_text(SEEDED_SPEC)
    args = ("seeded", "--scale", "smoke", "--spec-dir", str(specs), "--jobs", "2")
    assert reproduce(tmp_path, data_dir, *args) == 0
    out = capsys.readouterr().out
    assert "4 training runs to do" in out and "estimate:" in out and "campaign done" in out
    runs = ResultsStore(tmp_path / "results").runs("seeded", "smoke")
    assert {row: sorted(r["seed"] for r in recs) for row, recs in runs.items()} == {"shared": [0, 1],
                                                                                   "free": [0, 1]}
    for recs in runs.values():
        assert len({r["config_hash"] for r in recs}) == 2  # the seed is part of the configuration
        for r in recs:
            assert r["machine"]["threads"] == 1 and f"--seeds {r['seed']}" in r["command"]
    assert len(list((tmp_path / "runs" / "smoke" / "logs").glob("seeded-*.log"))) == 4
    assert reproduce(tmp_path, data_dir, *args) == 0
    assert "0 training runs to do" in capsys.readouterr().out
    assert sum(len(r) for r in ResultsStore(tmp_path / "results").runs("seeded", "smoke").values()) == 4


def test_a_dirty_tree_is_refused_at_cpu_scale(tmp_path, monkeypatch, capsys):
    from dacnn.experiments import provenance, runner

    no_git = tmp_path / "no-git"
    monkeypatch.setattr(runner, "check_clean", lambda allow: provenance.check_clean(allow, no_git))
    assert main(["reproduce", "table2", "--scale", "cpu", "--rows", "d3-shared", "--results",
                 str(tmp_path / "results")]) == 2
    assert "--allow-dirty" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


@pytest.mark.integration
def test_dirty_means_uncommitted_changes_under_src(tmp_path):
    import subprocess

    from dacnn.experiments.provenance import tree_state

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    clean = tree_state.__wrapped__(tmp_path)
    assert not clean.dirty and len(clean.commit) == 40
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "t.jsonl").write_text("{}\n")  # outputs do not make a tree dirty
    assert not tree_state.__wrapped__(tmp_path).dirty
    (tmp_path / "src" / "a.py").write_text("x = 2\n")
    edited = tree_state.__wrapped__(tmp_path)
    (tmp_path / "src" / "b.py").write_text("y = 1\n")  # an untracked source file counts too
    added = tree_state.__wrapped__(tmp_path)
    assert edited.dirty and added.dirty and edited.diff_sha256 != added.diff_sha256
    assert edited.commit == clean.commit


def test_a_record_is_reused_only_by_the_source_that_made_it(tmp_path, data_dir, capsys):
    args = ("table2", "--scale", "smoke", "--rows", "d5-free")
    assert reproduce(tmp_path, data_dir, *args) == 0
    store_file = tmp_path / "results" / "smoke" / "table2.jsonl"
    record = json.loads(store_file.read_text())
    store_file.write_text(json.dumps({**record, "source_hash": "0" * 16}) + "\n")  # made by other code
    capsys.readouterr()
    assert reproduce(tmp_path, data_dir, *args) == 0
    assert "skipped" not in capsys.readouterr().out
    lines = [json.loads(line) for line in store_file.read_text().splitlines()]
    assert [r["source_hash"] for r in lines] == ["0" * 16, source_hash()]


def test_record_every_epoch_keeps_a_partial_record_until_the_full_one(tmp_path, data_dir, monkeypatch):
    """``--record-every-epoch``: after each epoch the run's record so far replaces its line in
    ``partial/``; a partial record never counts as done; the full record supersedes it."""
    seen: list[list[dict]] = []
    original = ResultsStore.write_partial

    def spy(self, record, *, drop=False):
        path = original(self, record, drop=drop)
        seen.append([json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else [])
        return path

    monkeypatch.setattr(ResultsStore, "write_partial", spy)
    args = ("table2", "--scale", "smoke", "--rows", "d3-shared", "--override", "epochs=2",
            "--record-every-epoch", "--note", "two epochs")
    assert reproduce(tmp_path, data_dir, *args) == 0
    assert [[r["extra"]["partial"] for r in lines] for lines in seen] == [
        [{"epochs_done": 1, "epochs": 2}], [{"epochs_done": 2, "epochs": 2}], []]
    first = seen[0][0]
    assert list(first) == list(RECORD_FIELDS) and first["test_acc"] is None and len(first["curve"]) == 1
    assert first["extra"]["note"] == "two epochs" and first["unique_params"] and first["flops"]
    store = ResultsStore(tmp_path / "results")
    assert not store.partial_path("table2", "smoke").exists()
    [record] = store.records("table2", "smoke")
    assert record["extra"]["note"] == "two epochs" and "--record-every-epoch" in record["command"]
    store.append({**record, "extra": {**record["extra"], "partial": first["extra"]["partial"]}})
    found = store.find("table2", "d3-shared", "smoke", record["config_hash"])
    assert found is not None and not found["extra"].get("partial")


def test_a_prune_row_prunes_each_seed_of_its_source():
    """A prune row plans one run per run of its source row (named by the source's config hash), so a
    source trained over two seeds is pruned twice; ``--seeds`` picks them as it picks the source's."""
    opts = RunOptions(scale="cpu", rows=["resnet18-w16-pruned-mix"])
    _, planned = plan(get_spec("frontier"), opts)
    sources = [p for p in planned if p.row.id == "resnet18-w16"]
    pruned = [p for p in planned if p.row.id == "resnet18-w16-pruned-mix"]
    assert [p.seed for p in sources] == [0, 1] and [p.seed for p in pruned] == [0, 1]
    assert [p.runner["source"] for p in pruned] == [p.chash for p in sources]
    assert [p.run_id for p in pruned] == ["resnet18-w16-pruned-mix#0", "resnet18-w16-pruned-mix#1"]
    assert len({p.chash for p in pruned}) == 2 and len({p.run_dir for p in pruned}) == 2
    _, only = plan(get_spec("frontier"), RunOptions(scale="cpu", rows=["resnet18-w16-pruned-mix"], seeds=[1]))
    assert [(p.row.id, p.seed) for p in only] == [("resnet18-w16", 1), ("resnet18-w16-pruned-mix", 1)]
    assert only[1].chash == pruned[1].chash


def test_a_prune_row_of_a_source_run_once_runs_once():
    """At smoke scale the source runs once (no seeds): one prune run, no seed in its name or record."""
    _, planned = plan(get_spec("frontier"), RunOptions(scale="smoke", rows=["resnet18-w16-pruned-mix"]))
    [pruned] = [p for p in planned if p.row.kind == "prune"]
    assert (pruned.run_id, pruned.seed) == ("resnet18-w16-pruned-mix", None)


def test_find_any_source_falls_back_to_another_code_version(tmp_path, data_dir):
    """A prune row's source is looked up by config hash from any code version (its trained model),
    the current code's record first; plain ``find`` only counts the current code's records."""
    assert reproduce(tmp_path, data_dir, "table2", "--scale", "smoke", "--rows", "d3-shared") == 0
    store = ResultsStore(tmp_path / "results")
    [record] = store.records("table2", "smoke")
    chash = record["config_hash"]
    other = {**record, "source_hash": "0" * 16, "finished": "earlier", "dirty": None}
    (tmp_path / "results" / "smoke" / "table2.jsonl").unlink()
    store.append(other)
    assert store.find("table2", "d3-shared", "smoke", chash) is None
    assert store.find("table2", "d3-shared", "smoke", chash, any_source=True)["finished"] == "earlier"
    store.append({**other, "finished": "dirty", "dirty": {"diff_sha256": "x"}})
    assert store.find("table2", "d3-shared", "smoke", chash, any_source=True)["finished"] == "earlier"
    store.append(record)
    assert store.find("table2", "d3-shared", "smoke", chash, any_source=True) == store.find(
        "table2", "d3-shared", "smoke", chash)


def test_a_prune_row_prunes_a_source_another_code_version_trained(tmp_path, data_dir, capsys):
    """A source row planned only for a prune row is not trained again when another code version
    recorded it: the prune reads that record's model (and says which config it pruned)."""
    assert reproduce(tmp_path, data_dir, "frontier", "--scale", "smoke", "--rows", "resnet18-w16") == 0
    path = tmp_path / "results" / "smoke" / "frontier.jsonl"
    [source] = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text(json.dumps({**source, "source_hash": "0" * 16, "dirty": None}) + "\n")
    capsys.readouterr()
    rows = ("--rows", "resnet18-w16-pruned-mix")
    assert reproduce(tmp_path, data_dir, "frontier", "--scale", "smoke", *rows) == 0
    out = capsys.readouterr().out
    assert "frontier/resnet18-w16: done" in out
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["row"] for r in records] == ["resnet18-w16", "resnet18-w16-pruned-mix"]
    assert records[1]["extra"]["source_config_hash"] == source["config_hash"]
