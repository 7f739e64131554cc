"""The training engine (:mod:`dacnn.train.engine`): a step in either memory format, test-time
augmentation. Autocast and the device path are in ``test_engine_amp.py``, ``torch.compile`` in
``test_engine_compile.py``."""

from __future__ import annotations

import pytest
import torch

from dacnn import create_model
from dacnn.train.engine import StepRunner, tta_logits


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


def test_tta_logits_average_the_views():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(tta_logits(net, x, 0), net(x))
    mirror = 0.5 * net(x) + 0.5 * net(x.flip(-1))
    assert torch.allclose(tta_logits(net, x, 1), mirror)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [padded[..., :8, :8], padded[..., 2:, 2:]]
    shifted = sum(0.5 * net(v) + 0.5 * net(v.flip(-1)) for v in views) / 2
    assert torch.allclose(tta_logits(net, x, 2), 0.5 * mirror + 0.5 * shifted, atol=1e-6)
