"""Helpers shared by test files (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import copy
import gzip
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dacnn import AnchoredConv2d, create_model, list_models, model_info
from dacnn import checkpoint as ckpt
from dacnn.data.synthetic import idx_bytes, write_fashion_mnist
from dacnn.train import loop as loop_module
from dacnn.train.config import dump_yaml, resolve_config

# what torch.load's own error advises, and a message of ours must never repeat
UNSAFE_ADVICE = ("weights_only set to False", "Re-running", "weights_only=False")


class Evil:
    """Unpickling it would run a shell command: what a trusted loader must refuse."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def read_only_command(path: Path, cmd: list[str]) -> list[str]:
    """``cmd`` run where ``path`` is read-only (a read-only tmpfs in a mount namespace for root)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        return cmd
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare, "-m", "true"], capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("running as root without mount namespaces: cannot make a read-only directory")
    return [unshare, "-m", "sh", "-c", 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"', str(path), *cmd]


def poison_training_forward(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    """The model ``train()`` builds returns inf from its ``at``-th training-mode forward on."""
    original = loop_module.build_model

    def poisoned(name, kwargs):
        model, calls = original(name, kwargs), {"n": 0}

        def hook(module, args, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] == at:
                    return output * float("inf")
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(loop_module, "build_model", poisoned)


# family -> (builder kwargs that keep a model small, input side or None for its own): the named variants
# fix depth and width, so the families without a width argument run on small images instead.
SMALL: dict[str, tuple[dict, int | None]] = {
    "airbench": ({"width": 4}, None),
    "convmixer": ({}, 8),
    "dacnn": ({"width": 4}, None),
    "lrunet": ({"layer_reuse": 2}, None),
    "resnet": ({"width": 4}, None),
    "se_resnet": ({}, 8),
    "sharesnet": ({}, 8),
    "vgg": ({"width": 8}, None),
}


def small_model(name: str, seed: int = 0, **kwargs):
    """Registered model ``name`` at its family's small size, initialised from ``seed``."""
    torch.manual_seed(seed)
    return create_model(name, **{**SMALL[model_info(name).family][0], **kwargs})


def small_input(model, batch: int = 2, seed: int = 1):
    """A batch for ``model``: its channels, at its family's small side (or its own input size)."""
    chans, height, width = model.info.input_size
    side = SMALL[model.info.family][1]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, chans, side or height, side or width, generator=gen)


def synthetic_fashion_mnist(root: Path, n_train: int, n_test: int = 20) -> Path:
    """``root`` holding the project's synthetic Fashion-MNIST (train seed 1, test seed 2)."""
    write_fashion_mnist(root / "fashion_mnist", "train", n=n_train, seed=1)
    write_fashion_mnist(root / "fashion_mnist", "test", n=n_test, seed=2)
    return root


def first_kernel_copied(original: torch.nn.Module, report) -> torch.nn.Module:
    """A copy of ``original`` with each ``share_kernels`` group's first conv weight (and bias) copied
    into its other members, in eval mode: the function the tied model must compute."""
    twin = copy.deepcopy(original)
    with torch.no_grad():
        for group in report.groups:
            first = twin.get_submodule(group.uses[0])
            for name in group.uses[1:]:
                member = twin.get_submodule(name)
                member.weight.copy_(first.weight)
                if first.bias is not None:
                    member.bias.copy_(first.bias)
    return twin.eval()


def shared_model_names() -> list[str]:
    """The registered models that apply a shared kernel (an ``AnchoredConv2d``), built on the meta device."""
    with torch.device("meta"):
        models = {n: create_model(n) for n in list_models()}
    return [n for n, m in models.items() if any(isinstance(u, AnchoredConv2d) for u in m.modules())]


def _write_toy_fashion_mnist(root, n_train=96, n_test=40):
    """Fashion-MNIST IDX files where the class sets the brightness (learnable, tiny)."""
    rng = np.random.default_rng(0)
    folder = root / "fashion_mnist"
    folder.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images = (rng.integers(0, 60, size=(n, 28, 28)) + labels[:, None, None] * 20).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(idx_bytes(array)))


def make_run(tmp_path, monkeypatch):
    """A run directory as `dacnn train` leaves it (config.yaml + checkpoints, toy data), without training."""
    monkeypatch.setenv("DACNN_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    _write_toy_fashion_mnist(data)
    kwargs = {"num_classes": 10, "in_chans": 1, "width": 4}
    cfg = resolve_config(
        {
            "model": "dacnn14",
            "dataset": "fashion_mnist",
            "data_dir": str(data),
            "width": 4,
            "batch_size": 32,
            "val_size": 32,
            "device": "cpu",
            "epochs": 1,
        }
    )
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    torch.manual_seed(0)
    model = create_model("dacnn14", **kwargs)
    meta = {
        "model": "dacnn14",
        "model_kwargs": kwargs,
        "dataset": "fashion_mnist",
        "normalize": True,
        "pad_to": 32,
    }
    state = {"epoch": 0, "batches_done": 4, "global_step": 4}
    ckpt.save_checkpoint(
        run / "checkpoints", model=model, ema_model=None, state=state, meta=meta, is_best=True
    )
    return run, data
