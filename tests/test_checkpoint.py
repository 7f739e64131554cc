"""Checkpoint io (:mod:`dacnn.checkpoint`): atomic writes, shared tensors stored once and tied after
loading, weights-only state, and what a damaged or untrusted file is called.

End-to-end runs that save, resume and recover are in ``test_train_resume.py`` and ``test_run_safety.py``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from _helpers import UNSAFE_ADVICE, Evil
from dacnn import SharedKernel, count_params, create_model
from dacnn import checkpoint as ckpt
from dacnn.errors import CheckpointError, WriteError


def _state_keys(path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return sorted(f.keys())


def test_atomic_write_keeps_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "state.txt"
    ckpt.atomic_write_text(target, "old")

    def failing(tmp):
        tmp.write_text("half-writ")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.txt"]  # no temporary left behind


def test_a_failed_atomic_write_names_the_file():
    with pytest.raises(WriteError, match="cannot write /proc/no-such-dir/x"):
        ckpt.atomic_write_text("/proc/no-such-dir/x", "text")


def test_shared_kernel_stored_once_and_tied_after_load(tmp_path):
    shared = create_model("dacnn14", width=16, num_classes=10)
    free = create_model("dacnn14", width=16, num_classes=10, shared=False)
    a, b = tmp_path / "shared.safetensors", tmp_path / "free.safetensors"
    ckpt.save_weights(shared, a, {"model": "dacnn14", "model_kwargs": {"width": 16, "num_classes": 10}})
    ckpt.save_weights(free, b, {"model": "dacnn14", "model_kwargs": {"width": 16, "num_classes": 10,
                                                                      "shared": False}})
    # the anchor appears under one key; the file holds unique params + buffers, no per-use copies
    anchor_keys = [k for k in _state_keys(a) if k.startswith("kernels.anchor.")]
    assert anchor_keys == ["kernels.anchor.weight"]
    stored = sum(t.numel() * t.element_size() for t in shared.state_dict().values())
    assert a.stat().st_size < stored + 16_384  # header only on top
    free_kernels = 12 * 16 * 16 * 9 * 4  # 12 anchored uses become 12 free kernels
    assert b.stat().st_size - a.stat().st_size >= free_kernels - 16 * 16 * 9 * 4

    loaded, meta = ckpt.load_model_file(a)
    assert meta["model"] == "dacnn14"
    assert count_params(loaded).unique == count_params(shared).unique
    torch.testing.assert_close(loaded.kernels.anchor.weight, shared.kernels.anchor.weight, rtol=0, atol=0)
    with torch.no_grad():  # tied: changing the one tensor changes every use
        loaded.kernels.anchor.weight.zero_()
    uses = [m for m in loaded.modules() if type(m).__name__ == "AnchoredConv2d"]
    assert len(uses) == 12 and all(u.kernel.weight is loaded.kernels.anchor.weight for u in uses)


class _Aliased(nn.Module):
    """Parameter aliasing (SPEC mechanism 1): one Parameter set as the weight of two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.c2.weight = self.c1.weight
        self.kernel = SharedKernel(4, 4)

    def forward(self, x):
        return self.kernel(self.c2(self.c1(x)))


def test_aliased_parameter_saved_once_and_retied(tmp_path):
    model, path = _Aliased(), tmp_path / "alias.safetensors"
    ckpt.save_weights(model, path, {"model": "none"})
    keys = _state_keys(path)
    assert len(keys) == len(list(model.parameters()))  # 4 unique tensors, not 5 state_dict keys
    fresh = _Aliased()
    ckpt.load_weights(fresh, path)
    assert fresh.c2.weight is fresh.c1.weight
    torch.testing.assert_close(fresh.c1.weight, model.c1.weight, rtol=0, atol=0)


def test_state_roundtrip_weights_only_and_rng(tmp_path):
    model = create_model("dacnn", depth=4, width=8, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    rng = ckpt.capture_rng()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    state = {"epoch": 1, "batches_done": 3, "epoch_done": False, "global_step": 11,
             "optimizer": opt.state_dict(), "rng": rng, "best": {"val_acc": 50.0, "epoch": 0},
             "config": {"lr": 0.1, "lr_milestones": [45]}}
    state_path = ckpt.save_checkpoint(tmp_path, model=model, ema_model=None, state=state,
                                      meta={"model": "dacnn", "model_kwargs": {"depth": 4, "width": 8,
                                                                               "num_classes": 10}},
                                      is_best=True)
    loaded = ckpt.load_state(state_path)
    assert loaded["global_step"] == 11 and loaded["config"]["lr_milestones"] == [45]
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(loaded["optimizer"])
    torch.rand(10), np.random.rand(10), random.random()  # move all generators on
    ckpt.restore_rng(loaded["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]
    pointer = ckpt.read_pointer(tmp_path, "last")
    assert pointer == ckpt.read_pointer(tmp_path, "best")
    assert (tmp_path / pointer["weights"]).is_file()


def test_old_versions_removed_but_best_kept(tmp_path):
    model = create_model("dacnn", depth=4, width=8, num_classes=10)
    meta = {"model": "dacnn", "model_kwargs": {"depth": 4, "width": 8, "num_classes": 10}}
    for step, best in ((5, True), (10, False), (15, False)):
        state = {"epoch": 0, "batches_done": step, "epoch_done": False, "global_step": step}
        ckpt.save_checkpoint(tmp_path, model=model, ema_model=None, state=state, meta=meta, is_best=best,
                             keep=1)
    versions = sorted({p.name.split(".")[0] for p in tmp_path.glob("e*")})
    assert versions == ["e0000-s00000005", "e0000-s00000015"]
    assert ckpt.read_pointer(tmp_path, "best")["global_step"] == 5


def test_loading_never_unpickles_arbitrary_objects_nor_advises_the_unsafe_option(tmp_path):
    path = tmp_path / "evil.state.pt"
    torch.save({"format": "dacnn.train_state/1", "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a trusted dacnn training state") as info:
        ckpt.load_state(path)
    assert not any(text in str(info.value) for text in UNSAFE_ADVICE)
    raw = tmp_path / "raw.state.pt"
    raw.write_bytes(pickle.dumps(OrderedDict(a=1), protocol=2))
    with pytest.raises(CheckpointError):
        ckpt.load_state(raw)


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_a_damaged_state_file_says_so(tmp_path, damage):
    buf = io.BytesIO()
    torch.save({"format": "dacnn.train_state/1", "epoch": torch.zeros(1000)}, buf)
    data = buf.getvalue()
    path = tmp_path / "e.state.pt"
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    with pytest.raises(CheckpointError) as info:
        ckpt.load_state(path)
    text = str(info.value)
    assert str(path) in text and "damaged, truncated or not a PyTorch checkpoint" in text
    for cryptic in ("Errno", "codec", "miniz", "UnpicklingError", "zip archive"):
        assert cryptic not in text


def test_weights_file_without_sidecar_uses_embedded_metadata(tmp_path):
    model = create_model("dacnn", depth=4, width=8, num_classes=10)
    path = tmp_path / "w.safetensors"
    kwargs = {"depth": 4, "width": 8, "num_classes": 10}
    ckpt.save_weights(model, path, {"model": "dacnn", "model_kwargs": kwargs, "dataset": "cifar10"})
    path.with_suffix(".json").unlink()
    loaded, meta = ckpt.load_model_file(path)
    assert meta["dataset"] == "cifar10"
    assert json.loads(json.dumps(meta))["model_kwargs"]["width"] == 8


def test_missing_or_mismatched_weights_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_model_file(tmp_path / "nope.safetensors")
    model = create_model("dacnn", depth=4, width=8, num_classes=10)
    path = tmp_path / "w.safetensors"
    ckpt.save_weights(model, path, {"model": "dacnn", "model_kwargs": {"depth": 4, "width": 16,
                                                                       "num_classes": 10}})
    with pytest.raises(CheckpointError, match="w.safetensors"):
        ckpt.load_model_file(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.read_pointer(tmp_path, "last")
