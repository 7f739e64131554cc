"""``share_kernels(model, budget=...)`` and ``dacnn share``: sharing chosen to meet a parameter budget.

The ground truth is the definition: the plan ties whole groups of the unbudgeted plan, largest
saving first, and stops as soon as the count is at most the target; a target below the floor (every
eligible group tied) is refused with the floor named and the model left as it was.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from dacnn import AnchoredConv2d, count_params, create_model, share_kernels
from dacnn.cli import main
from dacnn.errors import ConfigError
from dacnn.tying import Budget

MODELS = ["resnet18", "se_resnet_d_4", "wrn40_4", "vgg16_1fc", "sharesnet164"]


def _budgets(before: int, floor: int) -> list[object]:
    between = [Budget(max_params=floor + int(f * (before - floor))) for f in (0.0, 0.3, 0.7, 1.0)]
    ratios = [f"ratio={r}" for r in (0.5, 0.75, 0.9) if int(r * before) >= floor]
    return [*between, *ratios, {"max_params": before + 1}]


@pytest.mark.parametrize("name", MODELS)
def test_budget_plan_meets_the_target_largest_savings_first(name: str) -> None:
    torch.manual_seed(0)
    base = create_model(name)
    x = torch.randn(2, *base.info.input_size)
    full = share_kernels(copy.deepcopy(base), example_input=x)
    before, floor = full.params_before, full.floor
    assert floor == full.params_after < before
    for budget in _budgets(before, floor):
        model = copy.deepcopy(base)
        report = share_kernels(model, budget=budget, example_input=x)
        target = Budget.parse(budget).target(before)
        assert report.target == target and report.floor == floor
        assert report.params_after <= target
        # the figures add up
        counts = count_params(model)
        assert before - sum(g.saved for g in report.groups) == report.params_after == counts.unique
        assert counts.per_use == before
        # whole groups of the unbudgeted plan, the largest savings first, no more than needed
        full_uses = [g.uses for g in full.groups]
        assert all(g.uses in full_uses for g in report.groups)
        chosen = [g.saved for g in report.groups]
        left = [g.saved for g in full.groups if g.uses not in [c.uses for c in report.groups]]
        if chosen and left:
            assert min(chosen) >= max(left)
        if chosen:
            assert report.params_after + min(chosen) > target
        for g in full.groups:
            if g.uses not in [c.uses for c in report.groups]:
                assert all("budget met" in report.skipped[u] for u in g.uses)


def test_budget_ties_only_what_is_safe_and_keeps_the_function() -> None:
    class StdConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
            return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)

    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1)] + [nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)]
    layers += [StdConv(8, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)]
    layers += [nn.Conv2d(16, 16, 3, padding=1) for _ in range(2)]
    original = nn.Sequential(*layers)
    x = torch.randn(2, 3, 8, 8)
    shared = copy.deepcopy(original)
    # the 8->8 group (1, 2, 3) saves 2 * 584, the 16->16 one (6, 7) 2,320: one parameter under the
    # original needs only the larger
    before = sum(p.numel() for p in original.parameters())
    report = share_kernels(shared, scope="global", budget={"max_params": before - 1})
    assert [g.uses for g in report.groups] == [["6", "7"]]
    assert "overrides forward" in report.skipped["4"] and "budget met" in report.skipped["1"]
    with torch.no_grad():
        expected = copy.deepcopy(original)
        expected[7].weight.copy_(expected[6].weight)
        expected[7].bias.copy_(expected[6].bias)
        torch.testing.assert_close(shared(x), expected(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="floor"):  # the StdConv can never be tied
        share_kernels(copy.deepcopy(original), scope="global", budget=Budget(ratio=0.1))


def test_unreachable_budget_names_the_floor_and_leaves_the_model() -> None:
    model = create_model("se_resnet_d_2")
    floor = share_kernels(create_model("se_resnet_d_2")).floor
    keys = list(model.state_dict())
    with pytest.raises(ConfigError, match=f"leaves {floor:,}") as info:
        share_kernels(model, budget=f"max_params={floor - 1}")
    assert "max_params" in str(info.value) and "unchanged" in str(info.value)
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, AnchoredConv2d) for m in model.modules())
    assert share_kernels(model, budget=Budget(max_params=floor)).params_after == floor


@pytest.mark.parametrize("spec,expected", [
    ("ratio=0.5", Budget(ratio=0.5)), ("max_params=1_000", Budget(max_params=1000)),
    (" max_params=42", Budget(max_params=42)), ({"ratio": 1}, Budget(ratio=1)),
    (Budget(max_params=0), Budget(max_params=0)),
])
def test_budget_forms(spec: object, expected: Budget) -> None:
    assert Budget.parse(spec) == expected
    assert Budget.parse(str(expected)) == expected


@pytest.mark.parametrize("spec,message", [
    ("ratio", "expected max_params=N or ratio=R"), ("params=5", "expected"), ("ratio=half", "not a number"),
    ("ratio=0", r"\(0, 1\]"), ("ratio=1.5", r"\(0, 1\]"), ("max_params=-1", "non-negative"),
    ("max_params=1.5", "not a number"), ({"ratio": 0.5, "max_params": 3}, "exactly one"),
    ({"size": 3}, "unknown key"), (0.5, "expected Budget"),
])
def test_bad_budgets_are_clear_errors(spec: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        share_kernels(nn.Sequential(nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1)), "global", budget=spec)


def test_containers_needs_container_scope() -> None:
    with pytest.raises(ConfigError, match="containers= needs scope='container'"):
        share_kernels(nn.Sequential(nn.Conv2d(1, 1, 1)), "global", containers="*")


# ---- dacnn share ---------------------------------------------------------------------------------
def test_cli_share_prints_the_plan(capsys: pytest.CaptureFixture) -> None:
    assert main(["share", "se_resnet_d_2", "--budget", "ratio=0.7", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    reference = share_kernels(create_model("se_resnet_d_2"), budget="ratio=0.7")
    assert plan["params_after"] == reference.params_after <= plan["target"]
    assert plan["target"] == int(0.7 * plan["params_before"])
    assert [g["uses"] for g in plan["groups"]] == [g.uses for g in reference.groups]
    assert plan["skipped"] == reference.skipped
    assert main(["share", "se_resnet_d_2", "--scope", "container", "--include", "*.conv2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("se_resnet_d_2 (scope=container") and "shared kernels" in out
    assert "not matched by include" in out


@pytest.mark.parametrize("argv,message", [
    (["share", "no_such_model"], "unknown model 'no_such_model'"),
    (["share", "se_resnet_d_2", "--budget", "ratio=0.01"], "cannot be met"),
    (["share", "se_resnet_d_2", "--budget", "half"], "expected max_params=N or ratio=R"),
])
def test_cli_share_bad_input_exits_2_without_traceback(argv: list[str], message: str,
                                                        capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("dacnn share: error:")
