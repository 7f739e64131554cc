"""The GPU campaign's planner (:mod:`dacnn.experiments.gpu_plan`) on a fake clock with stubbed timings.

No device and no timing is real here: ``measure`` returns made-up :class:`RowTiming` s and moves the
fake clock by what a measurement costs, so the tests prove what the planner decides: the priority pair
first, compile time counted, compiled only where it pays back, whole rows only, the later pairs only
with the time the earlier ones leave.
"""

from __future__ import annotations

import pytest

from dacnn.experiments.gpu_plan import (
    PRIORITY,
    CampaignRow,
    Planner,
    RowTiming,
    assumed_timing,
    plan_pair,
    scaled_milestones,
)
from dacnn.experiments.planning import RunOptions, plan
from dacnn.experiments.spec import get_spec


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def timing(step: float = 0.01, compile_s: float = 60.0, epochs: int = 90,
           eager_factor: float = 2.0) -> RowTiming:
    """351 steps, 10 val and 20 test batches (the paper protocol on CIFAR-10), 20 s start-up."""
    return RowTiming(startup_s=20.0, steps_per_epoch=351, val_batches=10, test_batches=20, epochs=epochs,
                     milestones=(45,), step_s=step * eager_factor, eval_batch_s=0.02 * eager_factor,
                     compile_s=compile_s, step_compiled_s=step, eval_batch_compiled_s=0.02)


def stub(clock: FakeClock, timings: dict[CampaignRow, RowTiming], cost: float = 40.0,
         log: list | None = None):
    def measure(rows) -> dict[CampaignRow, RowTiming]:
        clock.now += cost * len(rows)  # measuring takes device time too
        if log is not None:
            log.extend(rows)
        return {row: timings[row] for row in rows if row in timings}

    return measure


PAIR1, PAIR2 = PRIORITY[0], PRIORITY[1]


def test_the_priority_pair_is_table7_cifar10_resnet18_and_dacnn18_mix_reg_then_the_34_layer_pair():
    assert [r.name for r in PAIR1] == ["table7/c10-resnet18", "table7/c10-mix18-reg"]
    assert [r.name for r in PAIR2] == ["table7/c10-resnet34", "table7/c10-mix34-reg"]
    for pair in PRIORITY:
        for row in pair:
            get_spec(row.spec).row(row.row)  # every row exists


def test_the_priority_pair_is_planned_first_with_its_compile_time_counted():
    clock = FakeClock()
    timings = {r: timing(eager_factor=3.0) for r in PAIR1 + PAIR2}  # compiled pays back its 60 s
    measured: list[CampaignRow] = []
    planner = Planner(500.0, stub(clock, timings, log=measured), clock=clock, reserve_s=10.0,
                      say=lambda s: None)
    runs = planner.next_runs()
    assert [run.row for run in runs] == list(PAIR1) and measured == list(PAIR1)  # pair 2 not even measured
    left = 500.0 - 2 * 40.0 - 10.0  # the measurements' time is spent
    assert planner.left() == pytest.approx(left)
    epochs = runs[0].epochs
    assert all(run.epochs == epochs and run.compiled for run in runs)  # one schedule for the pair
    t = timings[PAIR1[0]]
    assert sum(run.seconds for run in runs) <= left < 2 * t.seconds(epochs + 1, True)  # the most that fits
    assert runs[0].seconds == pytest.approx(t.seconds(epochs, True))  # compile included in the estimate:
    free = RowTiming(**{**t.__dict__, "compile_s": 0.0})
    assert t.seconds(epochs, True) - free.seconds(epochs, True) == pytest.approx(1.15 * 60.0)
    more = plan_pair(PAIR1, {r: free for r in PAIR1}, left)
    assert more[0].epochs > epochs  # without the compile time the plan would have promised more epochs
    assert runs[0].milestones == tuple(scaled_milestones((45,), 90, epochs))
    assert f"scaled to the {epochs}" in runs[0].note() and "compiled" in runs[0].note()


def test_compile_is_used_only_where_it_pays_back_within_the_row():
    clock = FakeClock()
    slow_compile = {r: timing(compile_s=400.0, eager_factor=1.2) for r in PAIR1}
    runs = Planner(700.0, stub(clock, slow_compile), clock=clock, say=lambda s: None).next_runs()
    assert runs and not any(run.compiled for run in runs)
    t = slow_compile[PAIR1[0]]
    assert t.seconds(runs[0].epochs, False) < t.seconds(runs[0].epochs, True)


def test_a_row_that_cannot_finish_is_not_started_and_a_pair_falls_back_to_whole_rows():
    clock = FakeClock()
    lines: list[str] = []
    big, small = timing(step=0.5), timing(step=0.01)
    planner = Planner(150.0, stub(clock, {PAIR1[0]: big, PAIR1[1]: small}, cost=5.0), clock=clock,
                      pairs=[PAIR1], say=lines.append)
    runs = planner.next_runs()
    assert [run.row for run in runs] == [PAIR1[1]]  # the pair does not fit one epoch; its second row does
    assert planner.not_started == ["table7/c10-resnet18"]
    assert any("c10-resnet18: cannot finish" in line for line in lines)
    assert planner.next_runs() == []


def test_later_pairs_get_only_what_the_earlier_ones_leave():
    clock = FakeClock()
    tiny = {r: timing(step=0.0001, epochs=5) for r in PAIR1 + PAIR2}  # pair 1 reaches its protocol's epochs
    measured: list[CampaignRow] = []
    planner = Planner(1000.0, stub(clock, tiny, cost=10.0, log=measured), clock=clock, say=lambda s: None)
    first = planner.next_runs()
    assert [r.row for r in first] == list(PAIR1) and first[0].epochs == 5 and measured == list(PAIR1)
    clock.now += sum(r.seconds for r in first)  # the campaign runs them
    second = planner.next_runs()
    assert [r.row for r in second] == list(PAIR2) and measured == list(PAIR1 + PAIR2)
    clock.now = planner.deadline - 30.0  # almost nothing left: the rest are not measured, not started
    assert planner.next_runs() == []
    assert measured == list(PAIR1 + PAIR2) and "table6/resnet18@cifar10" in planner.not_started


def test_a_row_that_cannot_be_measured_is_skipped():
    clock = FakeClock()
    planner = Planner(500.0, stub(clock, {PAIR1[1]: timing()}), clock=clock, pairs=[PAIR1],
                      say=lambda s: None)
    runs = planner.next_runs()
    assert [r.row for r in runs] == [PAIR1[1]] and planner.not_started == ["table7/c10-resnet18"]


def test_scaled_milestones_are_those_the_override_gives():
    for epochs in (1, 7, 12, 45, 90):
        p = plan(get_spec("table7"), RunOptions(scale="paper", rows=["c10-resnet18"],
                                                overrides={"epochs": epochs}))[1][0]
        assert p.train["lr_milestones"] == scaled_milestones((45,), 90, epochs)


def test_campaign_row_names_parse_back():
    for row in (r for pair in PRIORITY for r in pair):
        assert CampaignRow.parse(row.name) == row
    with pytest.raises(ValueError, match="SPEC/ROW"):
        CampaignRow.parse("table7")


def test_assumed_h200_timings_plan_the_priority_pair():
    clock = FakeClock()
    assumed = {r: assumed_timing(1.2e9) for r in PAIR1}
    runs = Planner(400.0, stub(clock, assumed, cost=90.0), clock=clock, say=lambda s: None).next_runs()
    assert [r.row for r in runs] == list(PAIR1) and 1 <= runs[0].epochs < 90
