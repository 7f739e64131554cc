"""The speed settings (:mod:`dacnn.train.speed`): their defaults per device, the config hashes of
records made before they became automatic, and training that they leave unchanged.

Ground truth: the config defaults the experiment records were hashed with, and the per-step
non-finite check and NCHW layout the device-side check and channels_last replace.
"""

from __future__ import annotations

import torch

from dacnn.experiments.store import config_hash
from dacnn.train import resolve_config, train
from dacnn.train.speed import resolve_speed


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


def test_device_side_check_and_channels_last_leave_the_training_unchanged(fashion_mnist_root, tmp_path):
    """Same seed, 40 steps: the per-step check against the device-side one must be bitwise equal
    (the check reads, never changes). NCHW against channels_last differs by rounding, which 40 steps
    at lr 0.05 amplify by an amount that depends on the CPU's kernels (61.9 % vs 67.2 % on an AVX2-only
    machine): both must learn, and the per-step agreement of the two layouts is checked where it is
    stable, on a few steps (``test_engine.py``)."""
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
