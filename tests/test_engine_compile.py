"""``torch.compile`` of models with a shared kernel, as ``dacnn train`` compiles them on a GPU.

The loop compiles the training model and the evaluation model separately (two ``torch.compile``
wrappers of one module); the shared kernel reaches 12-30 convolutions through as many module paths.
With ``backend="aot_eager"`` (Dynamo and AOTAutograd, no code generation, no C++ compiler) at small
width: one training step's loss and gradients equal eager's, an ``inference_mode`` evaluation at
other batch sizes equals eager's, with no graph break and at most two recompilations (train -> eval
mode, and a new batch size). The inductor test (C++ code generation through gcc; dacnn14 only) took
50-56 s with a cold cache (it runs in a fresh one) on the loaded 2-core development machine, under
the 60 s a default-run test may take.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

from dacnn import create_model
from dacnn.train.engine import StepRunner, evaluate

CASES = [("dacnn14", 8), ("dacnn18_mix_reg", 4)]


def _batches(sizes: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in sizes]


def _compiled_step_and_eval(name: str, width: int, backend: str) -> None:
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = create_model(name, width=width, num_classes=10)
    model = copy.deepcopy(eager)
    device = torch.device("cpu")
    runners = []
    for net, compiled in ((eager, False), (model, True)):
        opt = torch.optim.Adagrad(net.parameters(), lr=0.1)
        train_net = torch.compile(net, backend=backend) if compiled else net
        runners.append(StepRunner(train_net, opt, device))
    [(x, y)] = _batches((8,))
    (loss_eager, _), (loss, _) = (r.forward_backward(x, y) for r in runners)
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-6)
    grads = dict(eager.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=2e-5, msg=n)  # inductor: sum order
    for r in runners:
        r.apply()
    for (n, b), (_, b_eager) in zip(model.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(b, b_eager, rtol=1e-5, atol=1e-5, msg=n)  # BatchNorm statistics
    eval_net = torch.compile(model, backend=backend)  # as the loop does: its own wrapper
    loader = _batches((5, 3))
    got = evaluate(eval_net, loader, device)  # inference_mode; a compiled model is not BN-folded
    want = evaluate(eager, loader, device, fold_bn=False)
    assert got.n == want.n == 8
    assert got.loss == pytest.approx(want.loss, rel=1e-4) and got.acc == want.acc
    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]
    assert breaks == 0, dict(counters["graph_break"])
    assert 1 <= graphs <= 3, f"{graphs - 1} recompilations"  # train, then eval mode / new batch sizes


@pytest.mark.parametrize(("name", "width"), CASES)
def test_aot_eager_compile_matches_eager_with_no_graph_break(name, width):
    _compiled_step_and_eval(name, width, "aot_eager")


def test_inductor_compile_on_the_cpu_matches_eager():
    """In a fresh inductor cache: inductor's on-disk cache does not key its C++ kernels by
    ``ATEN_CPU_CAPABILITY``/``ONEDNN_MAX_CPU_ISA`` (torch 2.13), so a kernel compiled in a process run
    with the default instruction set and reused in one limited to AVX2 (or back) gave a loss 1.4 %
    off eager's, or a segmentation fault, on a Zen 4."""
    with fresh_cache():
        _compiled_step_and_eval("dacnn14", 8, "inductor")
