"""The training loop on real data: it learns, it logs, it stops on nan/inf, eval reproduces it.

Data: Fashion-MNIST from ``../shared/data`` (or ``$DACNN_DATA``), else the project's synthetic
Fashion-MNIST (the ``fashion_mnist_root`` fixture), so the tests run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import dacnn
from _helpers import poison_training_forward
from dacnn.analysis.evaluate import evaluate_checkpoint
from dacnn.cli import main
from dacnn.errors import ConfigError
from dacnn.train import TrainingDiverged, resolve_config, train

# A plain DACNN of 5 layers (4 convs, 3 of them one shared kernel), 16 channels: ~3k parameters.
TINY = {"model": "dacnn", "depth": 5, "width": 16, "dataset": "fashion_mnist",
        "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "batch_size": 64, "seed": 0}


@pytest.fixture(scope="module")
def tiny(fashion_mnist_root) -> dict:
    return {**TINY, "data_dir": fashion_mnist_root}


@pytest.fixture(scope="module")
def learned_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = resolve_config({**tiny, "train_subset": 4000, "val_size": 1000, "epochs": 2,
                          "lr_schedule": "cosine", "out_dir": str(out), "run_name": "learn"})
    return train(cfg, verbose=False)


def test_small_model_learns_fashion_mnist(learned_run):
    # Chance is 10 % (10 balanced classes). 2 epochs on 4,000 real images reach ~75-80 % with this
    # 3k-parameter net; 60 % is far above chance yet leaves room for seed and platform noise (the
    # synthetic fallback's classes differ in brightness only: it must clear the same bar).
    assert learned_run.test_acc >= 60.0
    assert learned_run.best_val_acc >= 60.0
    history = learned_run.history
    assert [r["epoch"] for r in history] == [0, 1]
    assert history[1]["train_loss"] < history[0]["train_loss"]


def test_run_directory_holds_config_logs_and_checkpoints(learned_run):
    run = Path(learned_run.run_dir)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"] == "dacnn" and saved["train_subset"] == 4000 and saved["lr_schedule"] == "cosine"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "wall_time"):
        assert key in lines[0]
    csv_lines = (run / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("epoch,")
    result = json.loads((run / "result.json").read_text())
    assert result["test_acc"] == pytest.approx(learned_run.test_acc)
    assert result["unique_params"] == learned_run.unique_params < result["per_use_params"]
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert (run / "checkpoints" / best["weights"]).is_file()


def test_eval_reproduces_the_runs_test_accuracy(learned_run, fashion_mnist_root, capsys):
    result, meta = evaluate_checkpoint(learned_run.run_dir, data_dir=fashion_mnist_root, device="cpu")
    assert result.n == 10000 and meta["model"] == "dacnn"
    assert result.acc == pytest.approx(learned_run.test_acc, abs=1e-9)
    weights = meta["weights"]
    assert main(["eval", "--checkpoint", weights, "--data-dir", fashion_mnist_root, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["accuracy"] == pytest.approx(learned_run.test_acc, abs=1e-9)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    poison_training_forward(monkeypatch, at=5)  # the 5th training forward returns inf
    cfg = resolve_config({**tiny, "train_subset": 640, "val_size": 200, "epochs": 1, "ckpt_every_steps": 2,
                          "eval_test": False, "out_dir": str(tmp_path), "run_name": "nan"})
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at epoch 1, batch 5/10 \(step 5\)"):
        train(cfg, verbose=False)
    pointer = json.loads((tmp_path / "nan" / "checkpoints" / "last.json").read_text())
    assert pointer["global_step"] == 4  # the checkpoint before the bad step
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "nan" / "checkpoints" / pointer["weights"])
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_the_device_side_nan_check_stops_at_the_epoch_end(fashion_mnist_root, tmp_path, monkeypatch):
    """nan_check_every=0 is the CUDA default (no host sync per step), run here on the CPU: an inf
    loss at step 3 is flagged on the device and read at the epoch's end; nothing is saved."""
    poison_training_forward(monkeypatch, at=3)
    cfg = resolve_config({"model": "dacnn", "depth": 5, "width": 8, "dataset": "fashion_mnist",
                          "data_dir": fashion_mnist_root, "train_subset": 640, "val_size": 100, "epochs": 1,
                          "batch_size": 64, "eval_test": False, "nan_check_every": 0,
                          "out_dir": str(tmp_path), "run_name": "nan"})
    with pytest.raises(TrainingDiverged, match=r"nan/inf after the last check, by epoch 1, batch 10/10"):
        train(cfg, verbose=False)
    assert not (tmp_path / "nan" / "checkpoints" / "last.json").exists()


def test_huge_learning_rate_exits_nonzero_with_a_message(fashion_mnist_root, tmp_path, capsys):
    argv = ["train", "--model", "dacnn", "--depth", "5", "--width", "16", "--dataset", "fashion_mnist",
            "--data-dir", fashion_mnist_root, "--train-subset", "640", "--val-size", "200", "--epochs", "1",
            "--lr", "1e10", "--no-eval-test", "--out-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    # Real images: the loss overflows first; the synthetic fallback: the weights (both stop the run).
    assert "loss became" in err or "weights or BatchNorm statistics are no longer finite" in err
    assert "Lower --lr" in err and "Traceback" not in err


def test_tensorboard_without_the_package_is_a_config_error(tiny, tmp_path):
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    cfg = resolve_config({**tiny, "train_subset": 128, "val_size": 64, "epochs": 1, "tensorboard": True,
                          "eval_test": False, "out_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"dacnn\[tb\]"):
        train(cfg, verbose=False)


@pytest.mark.slow
def test_compile_channels_last_and_ema_train(tiny, tmp_path):
    cfg = resolve_config({**tiny, "train_subset": 2048, "val_size": 256, "epochs": 2, "compile": True,
                          "channels_last": True, "ema": 0.5, "out_dir": str(tmp_path)})
    result = train(cfg, verbose=False)
    assert result.test_acc > 30.0  # chance: 10 %; ~49 % measured


@pytest.mark.parametrize("recipe", ["lrunet", "ks-seresnet"])
def test_recipes_run_scaled_down(recipe, fashion_mnist_root, tmp_path):
    # LruNet: dropout kwarg, crop + rotation + flip, no normalisation, 28 -> 32 padding;
    # SE-ResNet: its shared model and SGD settings. One tiny epoch each.
    cfg = resolve_config({"recipe": recipe, "dataset": "fashion_mnist", "data_dir": fashion_mnist_root,
                          "epochs": 1,
                          "train_subset": 128, "val_size": 64, "batch_size": 32, "eval_test": False,
                          "threads": 1, "out_dir": str(tmp_path)})
    result = train(cfg, verbose=False)
    assert result.history[0]["step"] == 4 and math.isfinite(result.history[0]["train_loss"])


def _stopped_and_resumed(base: dict, monkeypatch, stop) -> tuple:
    """``(whole, resumed, bitwise)``: a run of ``base`` uninterrupted, the same run stopped where
    ``stop(epoch, step, epoch_done)`` says (a KeyboardInterrupt after that checkpoint) and resumed, and
    whether their last checkpoints hold bitwise the same weights."""
    from safetensors.torch import load_file

    from dacnn import checkpoint as ckpt
    from dacnn.train import loop as loop_module

    whole = train(resolve_config({**base, "run_name": "whole"}), verbose=False)
    original = loop_module._Run.save

    def save_then_stop(self, epoch, batches_done, step, *args, **kwargs):
        original(self, epoch, batches_done, step, *args, **kwargs)
        if stop(epoch, step, bool(kwargs.get("epoch_done"))):
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_module._Run, "save", save_then_stop)
    cfg = resolve_config({**base, "run_name": "split"})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, verbose=False)
    monkeypatch.setattr(loop_module._Run, "save", original)
    resumed = train(cfg, resume=Path(base["out_dir"]) / "split", verbose=False)

    def weights(run: str) -> dict[str, torch.Tensor]:
        folder = Path(base["out_dir"]) / run / "checkpoints"
        return load_file(folder / ckpt.read_pointer(folder, "last")["weights"])

    a, b = weights("whole"), weights("split")
    return whole, resumed, a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), a


CONVMIXER = {"recipe": "ks-convmixer", "dataset": "fashion_mnist", "model": "dacnn", "depth": 4, "width": 8,
             "train_subset": 256, "val_size": 64, "batch_size": 32, "epochs": 2, "eval_test": False,
             "threads": 1, "deterministic": True, "ckpt_every_steps": 1}


def test_convmixer_recipe_augmentation_trains_and_resumes_bitwise(fashion_mnist_root, tmp_path, monkeypatch):
    """ks-convmixer's RandAugment, RandomErasing, mixup and CutMix with soft targets (SPEC.md 1.2) on a tiny
    model: a run stopped mid-epoch (epoch 2, batch 3) and resumed ends with bitwise the weights and the
    logged losses of the uninterrupted run (the draws are functions of seed, epoch and batch)."""
    pytest.importorskip("kornia")
    base = {**CONVMIXER, "data_dir": fashion_mnist_root, "out_dir": str(tmp_path)}
    whole, resumed, bitwise, _ = _stopped_and_resumed(base, monkeypatch,
                                                      lambda epoch, step, done: step == 8 + 3)
    assert all(math.isfinite(r["train_loss"]) for r in whole.history)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]
    assert bitwise
    changed = resolve_config({**base, "run_name": "seed", "seed": 1, "epochs": 1})
    assert train(changed, verbose=False).history[0]["train_loss"] != whole.history[0]["train_loss"]


FAST = {"recipe": "fast-cifar10", "dataset": "fashion_mnist", "model": "airbench94", "width": 4,
        "train_subset": 512, "val_size": 128, "batch_size": 64, "epochs": 3, "eval_batch_size": 256,
        "threads": 1, "deterministic": True, "seed": 1}


def test_fast_recipe_trains_and_resumes_bitwise(fashion_mnist_root, tmp_path, monkeypatch):
    """The fast recipe's pieces together (whitening, lookahead from epoch 0 of 3, translate, alternating
    flip, 64x shift lr, decoupled decay, TTA); a run stopped after epoch 2 and resumed ends with bitwise
    the weights of the uninterrupted run (the lookahead average is rebuilt from the epoch's weights)."""
    base = {**FAST, "data_dir": fashion_mnist_root, "out_dir": str(tmp_path)}
    whole, resumed, bitwise, a = _stopped_and_resumed(base, monkeypatch,
                                                      lambda epoch, step, done: epoch == 1 and done)
    assert whole.tta == 2 and whole.test_acc is not None and whole.test_acc_no_tta is not None
    assert whole.cpu_time and whole.cpu_time > 0
    assert resumed.test_acc == whole.test_acc and bitwise
    assert not torch.equal(a["whiten.weight"], torch.zeros_like(a["whiten.weight"]))


def test_shared_norm_scale_trains_the_scales_after_shared_kernels_only(fashion_mnist_root, tmp_path):
    """With freeze_norm_scale and shared_norm_scale, the BatchNorms right after a use of the shared
    kernel (airbench94_shared: block 2's second, block 3's both) learn their scale; the rest stay 1."""
    from safetensors.torch import load_file

    cfg = resolve_config({**FAST, "model": "airbench94_shared", "epochs": 1, "lookahead": False,
                          "shared_norm_scale": True, "data_dir": fashion_mnist_root, "out_dir": str(tmp_path),
                          "run_name": "r"})
    train(cfg, verbose=False)
    folder = tmp_path / "r" / "checkpoints"
    last = json.loads((folder / "last.json").read_text())
    weights = load_file(folder / last["weights"])
    scales = {k.removesuffix(".weight"): v for k, v in weights.items()
              if ".norm" in k and k.endswith(".weight")}
    free = {"block2.norm2", "block3.norm1", "block3.norm2"}
    assert set(scales) == free | {"block1.norm1", "block1.norm2", "block2.norm1"}
    for name, scale in scales.items():
        assert torch.equal(scale, torch.ones_like(scale)) != (name in free), name


def test_whitening_of_a_generic_stem_and_of_a_model_without_one():
    from dacnn.models.airbench import patch_whitening_weights
    from dacnn.train.whitening import init_patch_whitening

    images = torch.randn(16, 3, 16, 16)
    model = dacnn.create_model("resnet18", width=8, num_classes=10)  # stem.0: 3 -> 8, 3x3
    conv = init_patch_whitening(model, images)
    filters = patch_whitening_weights(images, 3)
    assert conv is model.stem[0] and not conv.weight.requires_grad
    assert torch.allclose(conv.weight[:4], filters[:4]) and torch.allclose(conv.weight[4:], filters[27:31])
    with pytest.raises(ConfigError, match="whiten"):
        init_patch_whitening(torch.nn.Sequential(torch.nn.Linear(3, 3)), images)


def test_deterministic_on_cuda_warns_and_sets_what_it_can_instead_of_raising_at_the_first_backward():
    from dacnn.train.builders import deterministic_mode

    assert deterministic_mode(False, "cuda") == deterministic_mode(False, "cpu")
    assert not deterministic_mode(False, "cuda").enabled
    cpu = deterministic_mode(True, "cpu")
    assert cpu.enabled and not cpu.warn_only and cpu.warning is None
    cuda = deterministic_mode(True, "cuda")
    assert cuda.enabled and cuda.warn_only  # deterministic kernels where they exist, a warning elsewhere
    assert "AdaptiveAvgPool2d" in cuda.warning and "not bitwise reproducible" in cuda.warning


def test_set_deterministic_applies_the_mode_of_the_device():
    import warnings

    from dacnn.train.builders import set_deterministic

    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert set_deterministic(True, "cpu").enabled and not caught
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            set_deterministic(True, torch.device("cuda"))  # needs no GPU: only torch's flags are set
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert [str(w.message) for w in caught if "on CUDA" in str(w.message)]
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
