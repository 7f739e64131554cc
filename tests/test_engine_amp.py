"""Every registered model trains and evaluates through the engine where a GPU would run it, on the CPU.

A lent GPU runs ``StepRunner`` and ``evaluate`` on CUDA tensors, in bf16 (or fp16) autocast, channels
last. CI has no GPU, so the two ways that path can differ from the CPU's are checked apart:

* **the device**: one training step and one evaluation on the ``meta`` device, which stands in for
  CUDA. A fast path that decides by ``device.type == "cpu"`` takes its GPU branch there, and every op
  it dispatches is checked against ATen's own table (``native_functions.yaml``, shipped with torch in
  ``torchgen``): an op with a CPU kernel and neither a CUDA nor a composite one (``_add_relu_``,
  ``to_mkldnn``, ...) fails the test, as it would fail on CUDA (some of them, ``_add_relu_`` among
  them, have meta kernels, so the meta device alone would not see them). Ops that have a CUDA kernel
  but no meta kernel are given a shape-only one here (:data:`CUDA_OPS_WITHOUT_META`).
* **the dtype**: one training step and one evaluation in bf16 and in fp16 autocast on the CPU, through
  the same code: a CPU kernel of fp32/fp64 only fails there. The CPU's fp16 autocast trains too (this
  torch has fp16 convolution backward on the CPU), so fp16 is checked for the step as well as eval.

Models are built small (width 8, or 16 where a family needs it); the full-size-only ones
(ConvMixer-256/16, WRN-28-10, WRN-40-4; seconds each in emulated fp16) are marked slow, and so are the
SE-ResNets whose blocks d_2 and d_10 already run.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from dacnn import create_model, list_models
from dacnn.train.engine import StepRunner, evaluate, tta_logits
from dacnn.train.inference import fold_batchnorm

FULL_SIZE_ONLY = ("convmixer_256_16", "convmixer_256_16_shared", "wrn28_10", "wrn28_10_shared", "wrn40_4",
                  "wrn40_4_shared")
FIXED_SIZE = ("lrunet_1x", "lrunet_2x", "sharesnet164", "sharesnet164_shared", *FULL_SIZE_ONLY)
# the blocks of se_resnet_d_2 and d_10 at depths between: slow, to keep the default run short
SAME_BLOCKS = tuple(f"se_resnet_d_{d}{s}" for d in (3, 4, 6, 8) for s in ("", "_shared"))
MODELS = [pytest.param(name, marks=pytest.mark.slow) if name in FULL_SIZE_ONLY + SAME_BLOCKS else name
          for name in list_models()]

# op -> where its CUDA kernel lives (aten/src/ATen/native/...): it runs on a GPU though no meta kernel
# exists, so the meta run gets a shape-only stand-in
CUDA_OPS_WITHOUT_META = {"batch_norm_update_stats": "cuda/Normalization.cu (batch_norm_update_stats_cuda)"}


@functools.cache
def cpu_only_ops() -> frozenset[str]:
    """``name.overload`` of every ATen op whose only dense kernel is a CPU one (no CUDA, composite or
    structured-delegate kernel)."""
    import torchgen

    path = Path(torchgen.__file__).parent / "packaged" / "ATen" / "native" / "native_functions.yaml"
    if not path.is_file():
        pytest.skip(f"this torch build has no {path}")
    ops = set()
    for entry in yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        keys = {k.strip() for key in (entry.get("dispatch") or {}) for k in key.split(",")}
        if ("CPU" in keys and not any("CUDA" in k for k in keys) and "structured_delegate" not in entry
                and not any(k.startswith("Composite") for k in keys)):
            ops.add(entry["func"].split("(")[0].replace(".default", ""))
    return frozenset(ops)


class NoCpuOnlyOps(TorchDispatchMode):
    """Fails at the first op that has no kernel but a CPU one (:func:`cpu_only_ops`)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = func._schema
        name = schema.name.split("::")[-1] + (f".{schema.overload_name}" if schema.overload_name else "")
        if name in cpu_only_ops():
            raise AssertionError(f"aten::{name} has only a CPU kernel, but runs on the GPU path")
        return func(*args, **(kwargs or {}))


def test_the_table_of_cpu_only_ops_names_add_relu():
    assert {"_add_relu_.Tensor", "_add_relu.Tensor", "to_mkldnn"} <= cpu_only_ops()
    assert not {"add.Tensor", "convolution", "batch_norm_update_stats"} & cpu_only_ops()
    with pytest.raises(AssertionError, match="_add_relu_"), NoCpuOnlyOps():
        torch.ops.aten._add_relu_(torch.zeros(2, device="meta"), torch.ones(2, device="meta"))


def _small(name: str) -> torch.nn.Module:
    kwargs = {} if name in FIXED_SIZE else {"width": 16 if name.startswith("se_resnet") else 8}
    torch.manual_seed(0)
    return create_model(name, num_classes=10, **kwargs)


@pytest.fixture(scope="module")
def meta_kernels():
    """Shape-only meta kernels of :data:`CUDA_OPS_WITHOUT_META`, for this module's tests only."""
    lib = torch.library.Library("aten", "IMPL")

    def batch_norm_update_stats(x, running_mean, running_var, momentum):
        c = x.shape[1]
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        return x.new_empty(c, dtype=dtype), x.new_empty(c, dtype=dtype)

    lib.impl("batch_norm_update_stats", batch_norm_update_stats, "Meta")
    assert set(CUDA_OPS_WITHOUT_META) == {"batch_norm_update_stats"}
    yield
    lib._destroy()


def _batch(n: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


@pytest.mark.parametrize("name", MODELS)
def test_train_step_and_eval_on_a_device_that_is_not_the_cpu(name, meta_kernels):
    device = torch.device("meta")
    model = _small(name).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    runner = StepRunner(model, opt, device, channels_last=True)
    x, y = _batch(2, "meta")
    with NoCpuOnlyOps():
        loss, correct = runner.step(x, y)
    assert loss.device.type == "meta" and loss.shape == ()
    net = fold_batchnorm(model).eval()  # what evaluate() runs (its .item() has no meta value)
    x = runner.prepare(_batch(3, "meta")[0])
    with torch.inference_mode(), NoCpuOnlyOps():
        logits = tta_logits(net, x)
    assert logits.shape == (3, 10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", MODELS)
def test_train_step_and_eval_in_reduced_precision_autocast(name, dtype):
    device = torch.device("cpu")
    model = _small(name).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    amp = "bf16" if dtype is torch.bfloat16 else "none"  # fp16: autocast_context ignores it on a CPU
    runner = StepRunner(model, opt, device, amp=amp, channels_last=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is torch.float16):
        loss, _ = runner.step(*_batch(2))
        result = evaluate(model, [_batch(2), _batch(1)], device, amp=amp, channels_last=True)
    assert torch.isfinite(loss)
    assert result.n == 3  # its loss may overflow fp16: one step leaves BatchNorm's running statistics far off
