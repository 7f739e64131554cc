"""Process-level settings (:mod:`dacnn.runtime`): the bf16 warning on CPUs without bf16, and the
glibc allocator tuning (checked in a fresh interpreter each)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from dacnn import runtime


def test_bf16_on_a_cpu_without_bf16_warns(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bf16"):
        runtime.warn_slow_amp(torch.device("cpu"), "bf16")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.warn_slow_amp(torch.device("cpu"), "bf16")
        runtime.warn_slow_amp(torch.device("cpu"), "none")


@pytest.mark.integration
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
