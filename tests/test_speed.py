"""Issue 14's speed-ups change no arithmetic beyond rounding: BN folding, speed defaults, the
allocator, DDP shards of the loader, the device-side non-finite check, and a fixed number of
training steps giving the same accuracy in either memory format.

Ground truth: the unfolded eval-mode network (in float64 folding is exact up to rounding), the
full-batch loader (a rank's shard is its ``[rank::world]`` slice), and the config defaults the
experiment records were hashed with.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from _helpers import poison_training_forward
from dacnn import count_params, create_model, runtime
from dacnn.data import Augment, DeviceLoader
from dacnn.data.synthetic import random_split
from dacnn.experiments.store import config_hash
from dacnn.models.lrunet import LruNet
from dacnn.train import TrainingDiverged, resolve_config, train
from dacnn.train.engine import StepRunner, evaluate
from dacnn.train.inference import fold_batchnorm
from dacnn.train.speed import resolve_speed

FOLD_MODELS = [("dacnn14", {"width": 8}), ("dacnn18_mix_reg", {}), ("resnet18", {"width": 4}),
               ("se_resnet_d_2_shared", {}), ("vgg16_1fc", {}), ("lrunet_1x", {"layer_reuse": 2})]


def _randomise_batchnorm(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0),
                              (m.weight.data, 0.5, 1.5), (m.bias.data, -0.2, 0.2)):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) * (hi - lo) + lo)


@pytest.mark.parametrize(("name", "kwargs"), FOLD_MODELS, ids=[m for m, _ in FOLD_MODELS])
def test_folded_copy_computes_the_eval_function_and_leaves_the_model_alone(name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kwargs).double()
    _randomise_batchnorm(model)
    model.eval()
    before = count_params(model)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        folded = fold_batchnorm(model)
        got = folded(x)
    assert (got - expected).abs().max() <= 1e-10 * expected.abs().max()
    assert count_params(model) == before  # still tied, nothing moved into the original
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert bns < sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_dacnn14_folds_every_batchnorm():
    folded = fold_batchnorm(create_model("dacnn14", width=8, num_classes=10))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_a_preactivation_block_outside_the_models_is_left_alone():
    class PreActBlock(nn.Module):  # bn1 comes before conv1: folding it into conv1 would be wrong
        def __init__(self) -> None:
            super().__init__()
            self.bn1, self.conv1 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv1(torch.relu(self.bn1(x)))

    block = PreActBlock().double()
    _randomise_batchnorm(block)
    block.eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(fold_batchnorm(block)(x), block(x), rtol=0, atol=1e-12)


def test_a_hooked_module_is_not_folded_and_its_hook_fires():
    model = create_model("dacnn14", width=8, num_classes=10).eval()
    calls = []
    conv = model.stages[0][0][0]  # an AnchoredConv2d use of the shared kernel
    conv.register_forward_hook(lambda *a: calls.append(1))
    folded = fold_batchnorm(model)
    with torch.no_grad():
        folded(torch.randn(1, 3, 32, 32))
    assert calls == [1]
    assert isinstance(folded.stages[0][0][1], nn.BatchNorm2d)


def test_lrunet_fast_path_keeps_firing_hooks_on_each_use():
    """The fused LruBlock path skips the AnchoredConv2d uses; with a hook on one it must step aside."""
    torch.manual_seed(0)
    net = LruNet(2, 1)
    calls = []
    net.stage1.dw_uses[1].register_forward_hook(lambda *a: calls.append(1))
    for train_mode in (True, False):
        net.train(train_mode)
        with torch.no_grad():
            net(torch.rand(2, 3, 32, 32))
    assert calls == [1, 1]


def test_evaluate_gives_the_same_figures_folded_or_not():
    torch.manual_seed(0)
    model = create_model("dacnn14", width=8, num_classes=10)
    _randomise_batchnorm(model)
    split = random_split(n=96, shape=(32, 32, 3), seed=0)
    loader = DeviceLoader(split, batch_size=40)
    a = evaluate(model, loader, torch.device("cpu"), fold_bn=False)
    b = evaluate(model, loader, torch.device("cpu"))
    assert a.acc == b.acc and a.n == b.n == 96
    assert abs(a.loss - b.loss) <= 1e-5 * max(1.0, abs(a.loss))
    assert model.training  # mode restored


def test_speed_defaults_per_device_and_explicit_settings_win():
    cfg = resolve_config({"model": "dacnn14", "dataset": "cifar10"})
    cpu = resolve_speed(cfg, torch.device("cpu"))
    assert (cpu.compile, cpu.amp) == (False, "none")
    assert cpu.channels_last is True  # dacnn: measured faster with channels_last on the CPU
    cuda = resolve_speed(cfg, torch.device("cuda"))
    assert (cuda.channels_last, cuda.compile, cuda.amp) == (True, True, "bf16")
    cfg = resolve_config({"model": "dacnn14", "dataset": "cifar10", "channels_last": False, "compile": True,
                          "amp": "fp16"})
    assert resolve_speed(cfg, torch.device("cuda")) == type(cuda)(False, True, "fp16")


def test_auto_speed_settings_hash_as_the_former_defaults():
    """Records made before the settings became automatic keep their config hashes."""
    cfg = resolve_config({"model": "dacnn14", "dataset": "cifar10"}).to_dict()
    old = {**cfg, "channels_last": False, "compile": False, "amp": "none"}
    assert config_hash(cfg, {"kind": "train"}) == config_hash(old, {"kind": "train"})
    changed = {**cfg, "channels_last": True}
    assert config_hash(changed, {"kind": "train"}) != config_hash(old, {"kind": "train"})


def test_bf16_on_a_cpu_without_bf16_warns(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bf16"):
        runtime.warn_slow_amp(torch.device("cpu"), "bf16")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.warn_slow_amp(torch.device("cpu"), "bf16")
        runtime.warn_slow_amp(torch.device("cpu"), "none")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_malloc_tuning_applies_once_and_can_be_switched_off():
    code = ("from dacnn.runtime import tune_malloc, malloc_tuned; "
            "print(tune_malloc(), tune_malloc(), malloc_tuned())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"]
    env["DACNN_TUNE_MALLOC"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


def test_each_rank_gathers_its_part_of_the_global_batch():
    split = random_split(n=64, shape=(28, 28, 1), seed=1)
    aug = Augment(crop_padding=2, flip=True, rotate_degrees=10.0, cutout=4)
    kw = {"batch_size": 16, "shuffle": True, "drop_last": True, "seed": 5, "augment": aug, "pad_to": 32}
    full = list(DeviceLoader(split, **kw))
    for rank in range(3):
        shard = list(DeviceLoader(split, rank=rank, world=3, **kw))
        assert len(shard) == len(full)
        for (xs, ys), (xf, yf) in zip(shard, full, strict=True):
            assert torch.equal(ys, yf[rank::3])
            assert torch.equal(xs, xf[rank::3])


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


def test_device_side_check_and_channels_last_leave_the_training_unchanged(fashion_mnist_root, tmp_path):
    """Same seed, 40 steps: the per-step check against the device-side one must be bitwise equal
    (the check reads, never changes). NCHW against channels_last differs by rounding, which 40 steps
    at lr 0.05 amplify by an amount that depends on the CPU's kernels (61.9 % vs 67.2 % on an AVX2-only
    machine): both must learn, and the per-step agreement of the two layouts is checked where it is
    stable, on a few steps (:func:`test_step_runner_is_the_same_in_either_memory_format`)."""
    base = {"model": "dacnn", "depth": 5, "width": 16, "dataset": "fashion_mnist",
            "data_dir": fashion_mnist_root, "train_subset": 2560, "val_size": 1000, "epochs": 1,
            "batch_size": 64, "lr": 0.05,
            "optimizer": "sgd", "momentum": 0.9, "eval_test": False, "threads": 1, "out_dir": str(tmp_path)}
    runs = {}
    for name, extra in {"per-step": {"nan_check_every": 1, "channels_last": False},
                        "device": {"nan_check_every": 0, "channels_last": False},
                        "nhwc": {"nan_check_every": 1, "channels_last": True}}.items():
        runs[name] = train(resolve_config({**base, **extra, "run_name": name}), verbose=False)
    per_step, device, nhwc = runs["per-step"], runs["device"], runs["nhwc"]
    assert per_step.history[0]["train_loss"] == device.history[0]["train_loss"]
    assert per_step.best_val_acc == device.best_val_acc
    assert min(per_step.best_val_acc, nhwc.best_val_acc) > 30.0, [r.best_val_acc for r in runs.values()]


def test_step_runner_is_the_same_in_either_memory_format():
    torch.manual_seed(0)
    a = create_model("dacnn14", width=8, num_classes=10)
    b = create_model("dacnn14", width=8, num_classes=10)
    b.load_state_dict(a.state_dict())
    b = b.to(memory_format=torch.channels_last)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    losses = []
    for model, cl in ((a, False), (b, True)):
        runner = StepRunner(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"),
                            channels_last=cl)
        losses.append([runner.step(x, y)[0].item() for _ in range(3)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
