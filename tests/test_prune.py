"""Magnitude pruning: exact fractions, smallest weights first, masks kept while fine-tuning, end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import dacnn
from _helpers import make_run
from dacnn.errors import ConfigError
from dacnn.prune import count_nonzero, keep_masks, magnitude_prune, prunable_weights, prune_run


def test_prunable_weights_list_a_shared_kernel_once():
    model = dacnn.create_model("dacnn14", width=8, num_classes=10)
    names = [n for n, _ in prunable_weights(model)]
    assert names.count("kernels.anchor.weight") == 1
    assert set(names) == {"kernels.anchor.weight", "stem.0.weight", "fc.weight"}


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prunes_exact_fraction_of_smallest_weights(scope):
    torch.manual_seed(0)
    model = dacnn.create_model("dacnn18_mix", width=4, num_classes=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nonzero_before, _ = count_nonzero(model)  # BN biases start at zero
    masks = magnitude_prune(model, 0.7, scope)
    weights = dict(prunable_weights(model))
    assert set(masks) == set(weights)
    removed = sum(int((~m).sum()) for m in masks.values())
    total = sum(w.numel() for w in weights.values())
    assert removed == round(0.7 * total) if scope == "global" else abs(removed - 0.7 * total) <= len(masks)
    kept, prunable = count_nonzero(model, prunable_only=True)
    assert prunable == total and kept == total - removed
    for name, mask in masks.items():
        old = before[name].abs()
        assert torch.equal(weights[name] == 0, ~mask)
        if scope == "layer":
            assert abs(int((~mask).sum()) - 0.7 * mask.numel()) <= 0.5
            assert old[~mask].max() <= old[mask].min()  # smallest magnitudes of each tensor removed
    if scope == "global":
        kept_mags = torch.cat([before[n].abs()[m] for n, m in masks.items()])
        gone_mags = torch.cat([before[n].abs()[~m] for n, m in masks.items()])
        assert gone_mags.max() <= kept_mags.min()
    for name, p in model.named_parameters():  # BN affine and biases untouched
        if name not in masks:
            assert torch.equal(p, before[name])
    nonzero, unique = count_nonzero(model)
    assert unique == dacnn.count_params(model).unique and nonzero == nonzero_before - removed


def test_masks_survive_optimizer_steps():
    torch.manual_seed(0)
    model = dacnn.create_model("dacnn14", width=8, num_classes=10)
    masks = magnitude_prune(model, 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    handle = keep_masks(optimizer, model, masks)
    start = model.kernels.anchor.weight.detach().clone()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert not torch.equal(model.kernels.anchor.weight, start)  # the kept weights did train
    for name, p in prunable_weights(model):
        assert torch.all(p[~masks[name]] == 0)
    handle.remove()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert count_nonzero(model, prunable_only=True)[0] > count_nonzero(model, prunable_only=True)[1] * 0.6


def test_bad_ratio_or_scope():
    model = dacnn.create_model("dacnn14", width=4)
    with pytest.raises(ConfigError, match="1.5"):
        magnitude_prune(model, 1.5)
    with pytest.raises(ConfigError, match="channel"):
        magnitude_prune(model, 0.5, scope="channel")


# ---------------------------------------------------------------- end to end on a tiny run


def test_prune_run_end_to_end(tmp_path, monkeypatch):
    from dacnn.loading import load_source

    run, data = make_run(tmp_path, monkeypatch)
    result = prune_run(run, ratio=0.6, epochs=1, data_dir=str(data), limit=40, verbose=False)
    out = tmp_path / "runs" / "tiny-pruned0.6"
    assert result["output"] == str(out)
    assert json.loads((out / "prune.json").read_text())["acc_after"] == result["acc_after"]
    for key in ("acc_before", "acc_pruned", "acc_after"):
        assert 0.0 <= result[key] <= 100.0
    assert result["acc_drop"] == pytest.approx(result["acc_before"] - result["acc_after"])
    assert len(result["history"]) == 1 and result["lr"] == pytest.approx(0.01)  # a tenth of the run's
    assert result["finetune_cpu_time"] > 0
    # the saved pruned model reloads with its zeros (masks held through fine-tuning) and tying intact
    model, meta = load_source(out)
    assert meta["pruned"]["ratio"] == 0.6
    kept, prunable = count_nonzero(model, prunable_only=True)
    assert kept == result["prunable_kept"] and kept <= round(0.4 * prunable)
    assert count_nonzero(model)[0] == result["nonzero_params"]
    assert dacnn.count_params(model).shared[0].uses == 12


def test_prune_cli_reports_and_errors(tmp_path, monkeypatch, capsys):
    from dacnn.cli import main

    run, data = make_run(tmp_path, monkeypatch)
    out = tmp_path / "pruned"
    code = main(
        ["prune", str(run), "--ratio", "0.5", "--data-dir", str(data), "--limit", "20", "-o", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "prune.json").read_text())
    assert saved["ratio"] == 0.5 and saved["epochs"] == 0 and saved["acc_after"] == saved["acc_pruned"]
    assert f"pruned 50% of the conv/linear weights (global): {saved['nonzero_params']:,} of" in printed
    assert f"drop {saved['acc_drop']:.2f} points" in printed and f"wrote {out}" in printed
    assert (out / "checkpoints" / "best.json").is_file()
    assert main(["prune", str(tmp_path / "nope"), "--ratio", "0.5"]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # refused at parse time (dacnn.validation)
        main(["prune", str(run), "--ratio", "1.0", "--data-dir", str(data)])
    assert exit_info.value.code == 2
    assert "--ratio" in capsys.readouterr().err
