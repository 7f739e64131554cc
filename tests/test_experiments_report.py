"""``dacnn report`` rebuilds the results page and its plots from a results store alone.

The store is filled by real smoke-scale runs on tiny random data (see ``test_experiments.py``), so
every number in the page comes from a record; the test checks that the paper's numbers and ours
both appear, that the plots exist, and that hand-written reading blocks survive regeneration.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dacnn.cli import main
from dacnn.experiments import ResultsStore
from dacnn.experiments.report import read_blocks

RUNS = {"table2": "d3-shared,d3-free", "figure7": "dacnn5", "lrunet_sweep": "n1,n2", "table8": "sm-27"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dacnn.data.synthetic import write_cifar, write_fashion_mnist

    root = tmp_path_factory.mktemp("report")
    data = root / "data"
    write_cifar(data / "cifar10", "cifar10", n_train=320, n_test=128)
    write_fashion_mnist(data / "fashion_mnist", "train", n=320)
    write_fashion_mnist(data / "fashion_mnist", "test", n=128, seed=1)
    mp = pytest.MonkeyPatch()
    mp.setenv("DACNN_CACHE", str(root / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, rows in RUNS.items():
            assert main(["reproduce", name, "--scale", "smoke", "--rows", rows, "--results",
                         str(root / "results"), "--runs-dir", str(root / "runs"), "--data-dir", str(data),
                         "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return root / "results"


def test_report_puts_paper_and_ours_side_by_side(store, tmp_path):
    out = tmp_path / "docs" / "results.md"
    assert main(["report", "--results", str(store), "--output", str(out), "--scales", "smoke"]) == 0
    text = out.read_text()
    records = ResultsStore(store).latest("table2", "smoke")
    d3 = records["d3-shared"]
    row = next(line for line in text.splitlines() if line.startswith("| 3 layers, DACNN (shared)"))
    assert "56.91" in row and "0.164 M" in row  # the paper's error and size
    assert f"{d3['test_error']:.2f}" in row and "cifar10 256/64/128" in row  # ours, with its data
    delta = records["d3-shared"]["test_error"] - records["d3-free"]["test_error"]
    assert f"= **{delta:+.2f} points** at smoke scale (cifar10, n=1/1), one seed: " in text
    assert "; paper: +2.50 points" in text
    # one seed each, 128 test images: the binomial standard error of the difference, by hand
    pa, pb = records["d3-free"]["test_error"] / 100, d3["test_error"] / 100
    se = 100 * ((pa * (1 - pa) + pb * (1 - pb)) / 128) ** 0.5
    verdict = "resolved against test-set noise only" if abs(delta) > 2 * se else "not resolved"
    assert f"one seed: {verdict}" in text
    sm = next(line for line in text.splitlines() if line.startswith("| SM Pruning 27.1 %"))
    assert "1.30" in sm and "27.1 %" in sm
    assert "| Agent Pruning 37.0 % (quoted) |" in text
    assert "Not run at smoke scale yet" in text  # e.g. table1, absent from this store
    assert not (out.parent / "figures" / "figure5_error_vs_params_smoke.png").exists()  # no table6 runs
    for png in ("table2_depth_smoke.png", "figure7_filters_smoke.png", "lrunet_sweep_reuse_smoke.png"):
        path = out.parent / "figures" / png
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"](figures/{png})" in text


def test_report_keeps_hand_written_reading_and_is_stable(store, tmp_path):
    out = tmp_path / "results.md"
    args = ["report", "--results", str(store), "--output", str(out), "--scales", "smoke"]
    assert main(args) == 0
    text = out.read_text()
    assert read_blocks(out)["table2"] == "_No reading written yet._\n"
    edited = re.sub(r"(<!-- reading:table2:begin -->\n).*?(<!-- reading:table2:end -->)",
                    r"\1Sharing costs little here.\n\2", text, flags=re.S)
    edited = edited.replace("_No reading written yet._\n<!-- reading:summary:end -->",
                            "Hand-written summary.\n<!-- reading:summary:end -->")
    out.write_text(edited)
    figure = tmp_path / "figures" / "table2_depth_smoke.png"
    before = figure.read_bytes()
    assert main(args) == 0
    blocks = read_blocks(out)
    assert blocks["table2"] == "Sharing costs little here.\n"
    assert blocks["summary"] == "Hand-written summary.\n"
    assert out.read_text() == edited  # nothing else changed: the same records give the same page
    assert figure.read_bytes() == before


def test_report_rejects_an_unknown_scale(tmp_path, capsys):
    out = str(tmp_path / "r.md")
    assert main(["report", "--results", str(tmp_path), "--output", out, "--scales", "gpu"]) == 2
    assert "unknown scale 'gpu'" in capsys.readouterr().err


def test_report_refuses_a_store_without_records(store, tmp_path, capsys):
    out = tmp_path / "results.md"
    out.write_text("kept\n")
    args = ["report", "--results", str(tmp_path / "reslts"), "--output", str(out), "--scales", "smoke"]
    assert main(args) == 2
    assert "no records" in capsys.readouterr().err
    assert out.read_text() == "kept\n"


def _seeded_store(store: Path, root: Path, errors: dict[str, list[float]], dirty: str | None = None,
                  experiment: str = "table2") -> Path:
    """A copy of the smoke records of ``experiment``, one per seed, with the given test errors."""
    originals = ResultsStore(store).latest(experiment, "smoke")
    path = root / "smoke" / f"{experiment}.jsonl"
    path.parent.mkdir(parents=True)
    lines = []
    for row, errs in errors.items():
        for seed, err in enumerate(errs):
            rec = {**originals[row], "seed": seed, "test_error": err, "test_acc": 100 - err}
            rec["dirty"] = {"diff_sha256": "0" * 64} if row == dirty else None
            lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return root


def test_the_accuracy_column_is_the_mean_over_seeds_too(store, tmp_path):
    results = _seeded_store(store, tmp_path / "a", {"n1": [20.0, 30.0]}, experiment="lrunet_sweep")
    out = tmp_path / "a.md"
    assert main(["report", "--results", str(results), "--output", str(out), "--scales", "smoke"]) == 0
    row = next(x for x in out.read_text().splitlines() if x.startswith("| 1-LruNet-1x"))
    # errors 20 and 30: accuracy 75 with sample sd sqrt(50) = 7.07, beside the error's 25 ± 7.07
    assert "| 25.00 ± 7.07 (n=2) |" in row and "| 75.00 ± 7.07 (n=2) |" in row


def test_seeds_give_mean_sd_and_a_resolved_verdict(store, tmp_path):
    """Mean, sample sd and the 2-standard-error rule, checked against the formulas by hand."""
    errors = {"d3-free": [10.0, 11.0, 12.0], "d3-shared": [20.0, 21.0, 22.0]}
    results = _seeded_store(store, tmp_path / "a", errors, dirty="d3-free")
    out = tmp_path / "a.md"
    assert main(["report", "--results", str(results), "--output", str(out), "--scales", "smoke"]) == 0
    text = out.read_text()
    shared = next(x for x in text.splitlines() if x.startswith("| 3 layers, DACNN"))
    assert "| 21.00 ± 1.00 (n=3) |" in shared
    free = next(x for x in text.splitlines() if x.startswith("| 3 layers, free"))
    assert "‡" in free and "11.00 ± 1.00 (n=3)" in free
    # difference 10, standard error sqrt(1/3 + 1/3) = 0.82
    assert ("= **+10.00 points** at smoke scale (cifar10, n=3/3), standard error 0.82: resolved: higher "
            "error") in text
    errors = {"d3-free": [10.0, 14.0, 12.0], "d3-shared": [13.0, 11.0, 15.0]}
    results = _seeded_store(store, tmp_path / "b", errors)
    out = tmp_path / "b.md"
    assert main(["report", "--results", str(results), "--output", str(out), "--scales", "smoke"]) == 0
    text = out.read_text()
    # difference 1, standard error sqrt(4/3 + 4/3) = 1.63 > 1/2
    assert "= **+1.00 points** at smoke scale (cifar10, n=3/3), standard error 1.63: not resolved" in text
    assert "‡" not in text
    results = _seeded_store(store, tmp_path / "c", {"d3-free": [10.0], "d3-shared": [60.0]})
    out = tmp_path / "c.md"
    assert main(["report", "--results", str(results), "--output", str(out), "--scales", "smoke"]) == 0
    # one seed each on 128 test images: sqrt((0.1 * 0.9 + 0.6 * 0.4) / 128) = 5.08 points
    assert ("= **+50.00 points** at smoke scale (cifar10, n=1/1), one seed: resolved against test-set "
            "noise only (standard error 5.08; seed spread not measured): higher error") in out.read_text()


def test_a_pruned_row_shows_its_source_training_and_the_fine_tuning(store, tmp_path):
    out = tmp_path / "results.md"
    assert main(["report", "--results", str(store), "--output", str(out), "--scales", "smoke"]) == 0
    records = ResultsStore(store).latest("table8", "smoke")
    source, pruned = records["resnet18"], records["sm-27"]
    row = next(line for line in out.read_text().splitlines() if line.startswith("| SM Pruning 27.1 %"))
    assert f"| {source['epochs']} + {pruned['epochs']} |" in row and "| + " in row
    assert "A pruned row's epochs: its source's training + the fine-tuning" in out.read_text()
