"""Helpers shared by test files (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dacnn.train import loop as loop_module


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
