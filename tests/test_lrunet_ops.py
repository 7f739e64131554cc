"""``dacnn.models.lrunet_ops.add_relu_``: ATen's CPU-only ``_add_relu_`` only where it has a kernel.

It has CPU kernels for float32/float64 alone (no CUDA, bf16 or fp16 one) and no autograd formula;
everywhere else ``add_relu_`` computes the same ``relu(out + x)`` with ``add_`` and ``relu_``.
"""

from __future__ import annotations

import pytest
import torch

from dacnn.models.lrunet_ops import add_relu_, cpu_fused_add_relu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_add_relu_is_relu_of_the_sum_in_every_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    out, x = torch.randn(2, 8, 3, 3, generator=g).to(dtype), torch.randn(2, 8, 3, 3, generator=g).to(dtype)
    expected = torch.relu(out + x)
    assert cpu_fused_add_relu(out, x) == (dtype in (torch.float32, torch.float64))
    assert add_relu_(out, x) is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_the_fused_op_is_never_chosen_off_the_cpu_across_dtypes_or_under_autograd():
    a = torch.zeros(4)
    assert cpu_fused_add_relu(a, torch.zeros(4))
    assert not cpu_fused_add_relu(torch.zeros(4, device="meta"), torch.zeros(4, device="meta"))
    assert not cpu_fused_add_relu(a, torch.zeros(4, dtype=torch.float64))
    w = torch.zeros(4, requires_grad=True)
    assert not cpu_fused_add_relu(a, w)
    with torch.no_grad():
        assert cpu_fused_add_relu(a, w)
    out = torch.zeros(4, requires_grad=True).clone()
    add_relu_(out, w).sum().backward()  # the general path records a gradient
    assert w.grad is not None
