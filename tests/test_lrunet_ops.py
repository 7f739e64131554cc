"""``dacnn.models.lrunet_ops``: ``add_relu_`` in every dtype and under autograd, and the channel-order
cache under ``torch.compile`` (a traced call leaves nothing in it)."""

from __future__ import annotations

import pytest
import torch

from dacnn.models import lrunet_ops
from dacnn.models.lrunet_ops import add_relu_, shuffle_duplicate


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_add_relu_is_relu_of_the_sum_in_every_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    out, x = torch.randn(2, 8, 3, 3, generator=g).to(dtype), torch.randn(2, 8, 3, 3, generator=g).to(dtype)
    expected = torch.relu(out + x)
    assert add_relu_(out, x) is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_add_relu_records_a_gradient():
    w = torch.zeros(4, requires_grad=True)
    out = torch.zeros(4, requires_grad=True).clone()
    add_relu_(out, w).sum().backward()
    assert w.grad is not None


def test_a_compiled_call_leaves_no_traced_tensor_in_the_channel_order_cache():
    lrunet_ops._channel_orders.cache_clear()
    x = torch.randn(2, 8, 4, 4)
    want = shuffle_duplicate(x, True)[1]
    lrunet_ops._channel_orders.cache_clear()
    got = torch.compile(lambda t: shuffle_duplicate(t, True)[1], backend="eager", fullgraph=True)(x)
    assert lrunet_ops._channel_orders.cache_info().currsize == 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(shuffle_duplicate(x, True)[1], want, rtol=0, atol=0)  # eager after it
