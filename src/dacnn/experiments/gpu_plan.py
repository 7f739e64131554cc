"""The plan of a lent GPU's campaign (``scripts/gpu-campaign``): which paper-scale rows fit, with how many
epochs, compiled or eager.

A lent GPU gives one command of about 10 minutes. Before a row starts, its model is measured on the
device (:func:`measure_row`, in a process of its own): the start-up of a run (imports, data, model),
one training step and one evaluation batch eager, and, when compiling is possible, the first compiled
step and evaluation batch (their compile time) and the steady compiled ones. :class:`RowTiming` turns
that into the seconds a run of ``E`` epochs takes, compile time included, and picks compiled only where
it pays back within the row.

:class:`Planner` then fills the time left with whole rows in priority order (:data:`PRIORITY`: Table 7's
CIFAR-10 ResNet-18 and DACNN-18 (MIX, REG) first, as a pair with one schedule, then the 34-layer pair,
then Table 6's pairs on CIFAR-10): a pair gets the most epochs (up to the protocol's 90) that both its
rows finish in; a pair that cannot finish even one epoch each tries its rows alone, and a row that
cannot finish is not started. Each row runs the paper's schedule scaled to its epochs (the milestones
scale as ``--override epochs=E`` scales them). The next pair is measured only once the rows before it
are done, with the time then left: the priority rows are never starved by the later ones.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dacnn.experiments.planning import RunOptions, plan
from dacnn.experiments.spec import get_spec
from dacnn.train.builders import (
    build_data,
    build_model,
    build_optimizer,
    dataset_info,
    model_input_hw,
    model_kwargs,
    resolve_device,
)
from dacnn.train.config import config_from_dict
from dacnn.train.engine import StepRunner, evaluate
from dacnn.train.speed import resolve_speed

__all__ = ["CampaignRow", "PRIORITY", "RowTiming", "PlannedRun", "plan_pair", "Planner", "measure_row",
           "scaled_milestones", "assumed_timing"]

SAFETY = 1.15  # estimates are multiplied by this: a planned row must finish with room to spare
CHECKPOINT_S = 1.5  # per epoch: the checkpoint (weights, optimizer state, eval copy) and the partial record
FINISH_S = 15.0  # per row: the test evaluation's set-up, FLOP count, checksums and the record


@dataclass(frozen=True)
class CampaignRow:
    """One spec row the campaign may run (``dataset`` overrides the spec's, e.g. Table 6 on CIFAR-10)."""

    spec: str
    row: str
    dataset: str | None = None

    @property
    def name(self) -> str:
        return f"{self.spec}/{self.row}" + (f"@{self.dataset}" if self.dataset else "")

    @classmethod
    def parse(cls, text: str) -> CampaignRow:
        """``spec/row`` or ``spec/row@dataset``."""
        head, _, dataset = text.partition("@")
        spec, sep, row = head.partition("/")
        if not sep or not spec or not row:
            raise ValueError(f"expected SPEC/ROW[@DATASET], got {text!r}")
        return cls(spec, row, dataset or None)


PRIORITY: tuple[tuple[CampaignRow, ...], ...] = (
    (CampaignRow("table7", "c10-resnet18"), CampaignRow("table7", "c10-mix18-reg")),
    (CampaignRow("table7", "c10-resnet34"), CampaignRow("table7", "c10-mix34-reg")),
    (CampaignRow("table6", "resnet18", "cifar10"), CampaignRow("table6", "dacnn18-mix-reg", "cifar10")),
    (CampaignRow("table6", "resnet34", "cifar10"), CampaignRow("table6", "dacnn34-mix-reg", "cifar10")),
)


def scaled_milestones(milestones: Iterable[int], epochs: int, new_epochs: int) -> list[int]:
    """The lr milestones of a ``epochs``-epoch schedule scaled to ``new_epochs`` (as ``--override
    epochs=N`` scales them, :func:`dacnn.experiments.planning.plan`)."""
    ratio = new_epochs / epochs
    return sorted({max(1, int(m * ratio)) for m in milestones})


@dataclass(frozen=True)
class RowTiming:
    """What one row's run costs on this device (seconds), measured by :func:`measure_row`."""

    startup_s: float  # process start to the first step: imports, device, data, model
    steps_per_epoch: int
    val_batches: int
    test_batches: int
    epochs: int  # the protocol's (the most a plan gives)
    milestones: tuple[int, ...]
    step_s: float  # one training step, eager
    eval_batch_s: float  # one evaluation batch, eager (BatchNorm folded)
    compile_s: float | None = None  # first compiled step and eval batch minus steady ones; None: not measured
    step_compiled_s: float | None = None
    eval_batch_compiled_s: float | None = None

    @property
    def can_compile(self) -> bool:
        return None not in (self.compile_s, self.step_compiled_s, self.eval_batch_compiled_s)

    def seconds(self, epochs: int, compiled: bool) -> float:
        """Estimated wall time of a run of ``epochs`` epochs (compile time counted), with :data:`SAFETY`."""
        if compiled and not self.can_compile:
            raise ValueError("no compiled timing measured")
        step, batch = ((self.step_compiled_s, self.eval_batch_compiled_s) if compiled
                       else (self.step_s, self.eval_batch_s))
        assert step is not None and batch is not None
        epoch = self.steps_per_epoch * step + self.val_batches * batch + CHECKPOINT_S
        compile_s = (self.compile_s or 0.0) if compiled else 0.0
        work = compile_s + epochs * epoch + self.test_batches * self.eval_batch_s
        return self.startup_s + FINISH_S + SAFETY * work

    def best(self, epochs: int, allow_compile: bool = True) -> tuple[float, bool]:
        """``(seconds, compiled)`` of the faster way to run ``epochs`` epochs: compiled only if that
        pays back its compile time within the row."""
        eager = self.seconds(epochs, False)
        if allow_compile and self.can_compile:
            compiled = self.seconds(epochs, True)
            if compiled < eager:
                return compiled, True
        return eager, False


@dataclass(frozen=True)
class PlannedRun:
    """A row planned to run: its epochs, compiled or eager, the estimate and the scaled milestones."""

    row: CampaignRow
    epochs: int
    compiled: bool
    seconds: float
    milestones: tuple[int, ...]
    protocol_epochs: int
    protocol_milestones: tuple[int, ...]

    def note(self) -> str:
        """What the record says of its schedule (``extra.note``)."""
        drops = ", ".join(str(m) for m in self.milestones) or "none"
        paper = ", ".join(str(m) for m in self.protocol_milestones) or "none"
        return (f"scripts/gpu-campaign: the protocol's {self.protocol_epochs} epochs (lr drops at epoch "
                f"{paper}) scaled to the {self.epochs} that fit a lent GPU's time (lr drops at epoch "
                f"{drops}); {'compiled' if self.compiled else 'eager'}; planned at ~{self.seconds:.0f} s")

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row.name, "epochs": self.epochs, "compiled": self.compiled,
                "estimate_s": round(self.seconds, 1), "milestones": list(self.milestones)}


def _run(row: CampaignRow, timing: RowTiming, epochs: int, allow_compile: bool) -> PlannedRun:
    seconds, compiled = timing.best(epochs, allow_compile)
    milestones = tuple(scaled_milestones(timing.milestones, timing.epochs, epochs))
    return PlannedRun(row, epochs, compiled, seconds, milestones, timing.epochs, timing.milestones)


def plan_pair(pair: Sequence[CampaignRow], timings: dict[CampaignRow, RowTiming], left: float, *,
              max_epochs: int | None = None, allow_compile: bool = True) -> list[PlannedRun]:
    """The rows of ``pair`` (those measured) with the most epochs that all of them finish in within
    ``left`` seconds, the same for each (one schedule, so they compare); if not even one epoch each
    fits, the first row alone that fits (whole rows only); ``[]`` if none does."""
    rows = [r for r in pair if r in timings]

    def fit(group: list[CampaignRow]) -> list[PlannedRun]:
        cap = min(timings[r].epochs for r in group)
        cap = min(cap, max_epochs) if max_epochs else cap
        for epochs in range(cap, 0, -1):
            runs = [_run(r, timings[r], epochs, allow_compile) for r in group]
            if sum(run.seconds for run in runs) <= left:
                return runs
        return []

    if not rows:
        return []
    for group in [rows, *([r] for r in rows)] if len(rows) > 1 else [rows]:
        runs = fit(group)
        if runs:
            return runs
    return []


@dataclass
class Planner:
    """Serves :data:`PRIORITY` in order against a deadline (``budget`` seconds from now by ``clock``).

    :meth:`next_runs` measures the next pair (``measure(rows) -> {row: RowTiming}``, one process
    for both rows on the device; a row missing from the answer could not be measured; the
    measurement's own time counts) and plans it in the time then left minus ``reserve_s``; pairs
    that cannot finish are logged as not started and the next is tried.
    """

    budget: float
    measure: Callable[[Sequence[CampaignRow]], dict[CampaignRow, RowTiming]]
    clock: Callable[[], float] = time.monotonic
    pairs: list[tuple[CampaignRow, ...]] = field(default_factory=lambda: list(PRIORITY))
    reserve_s: float = 10.0
    max_epochs: int | None = None
    allow_compile: bool = True
    min_row_s: float = 60.0  # below this no row is measured (start-up and one compile alone take that)
    say: Callable[[str], Any] = print
    timings: dict[CampaignRow, RowTiming] = field(default_factory=dict)
    not_started: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.deadline = self.clock() + self.budget

    def left(self) -> float:
        """Seconds left for rows (the reserve kept back)."""
        return self.deadline - self.clock() - self.reserve_s

    def next_runs(self) -> list[PlannedRun]:
        """The next priority rows that fit the time left, measured first; ``[]`` when none is left."""
        while self.pairs:
            pair = self.pairs.pop(0)
            if self.left() < self.min_row_s:
                self._not_started(pair, f"{self.left():.0f} s left, too little to measure a row")
                continue
            todo = [row for row in pair if row not in self.timings]
            if todo:
                measured = self.measure(todo)
                self.timings.update({row: measured[row] for row in todo if row in measured})
                for row in todo:
                    if row not in measured:
                        self.say(f"plan: {row.name} could not be measured, not started")
                        self.not_started.append(row.name)
            runs = plan_pair(pair, self.timings, self.left(), max_epochs=self.max_epochs,
                             allow_compile=self.allow_compile)
            planned = {run.row for run in runs}
            self._not_started([r for r in pair if r in self.timings and r not in planned],
                              f"cannot finish in the {self.left():.0f} s left")
            if runs:
                total = sum(run.seconds for run in runs)
                ways = ", ".join(f"{'compiled' if r.compiled else 'eager'} ~{r.seconds:.0f} s" for r in runs)
                self.say(f"plan: {' + '.join(run.row.name for run in runs)}: {runs[0].epochs} epochs each "
                         f"(of {runs[0].protocol_epochs}), {ways}; {total:.0f} of {self.left():.0f} s left")
                return runs
        return []

    def _not_started(self, rows: Iterable[CampaignRow], why: str) -> None:
        for row in rows:
            self.say(f"plan: {row.name}: {why}, not started")
            self.not_started.append(row.name)


# ---------------------------------------------------------------------------------------- measuring
def campaign_overrides(row: CampaignRow, device: str) -> dict[str, Any]:
    """The training settings the campaign sets over a row's protocol (besides epochs and compile)."""
    overrides: dict[str, Any] = {"dataset": row.dataset} if row.dataset else {}
    if device == "cuda":
        overrides.update(amp="bf16", channels_last=True)
    return overrides


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: Any) -> float:
    _sync(device)
    tick = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - tick


def measure_row(row: CampaignRow, scale: str, device_name: str, *, compile_backend: str | None = "inductor",
                steps: int = 3) -> dict[str, Any]:
    """Measure one row's run on this device as ``dacnn reproduce`` will train it (the same config,
    data loaders, model, optimizer and :class:`~dacnn.train.engine.StepRunner`): seconds of set-up,
    of an eager step and evaluation batch, and with ``compile_backend`` (None: not measured) of the
    first and the steady compiled ones. Returns :class:`RowTiming`'s fields but ``startup_s``, with
    ``setup_s`` (what the caller adds its process start to)."""
    import torch

    tick = time.perf_counter()
    device = resolve_device(device_name)
    opts = RunOptions(scale=scale, rows=[row.row], overrides=campaign_overrides(row, device.type))
    [p] = [q for q in plan(get_spec(row.spec), opts)[1] if q.row.id == row.row][:1]
    cfg = config_from_dict({**p.train, "device": device_name})
    speed = resolve_speed(cfg, device)
    info = dataset_info(cfg.dataset)
    data = build_data(cfg, device, model_input_hw(cfg.model))
    model = build_model(cfg.model, model_kwargs(cfg, info.num_classes, info.image_size[2])).to(device)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    train_batches = list(itertools.islice(iter(data.train), steps + 1))
    val_batches = list(itertools.islice(iter(data.val), 2)) if data.val is not None else []

    def runner(net: Any) -> StepRunner:
        return StepRunner(net, optimizer, device, amp=speed.amp, label_smoothing=cfg.label_smoothing,
                          clip_grad=cfg.clip_grad, channels_last=speed.channels_last)

    def steps_of(r: StepRunner, batches: list[Any]) -> float:
        return _timed(lambda: [r.step(x, y) for x, y in batches], device)

    def evals(net: Any, batches: list[Any]) -> float:
        return _timed(lambda: evaluate(net, batches, device, amp=speed.amp,
                                       channels_last=speed.channels_last), device)

    setup_s = time.perf_counter() - tick
    eager = runner(model)
    steps_of(eager, train_batches[:1])  # warm-up (cuDNN autotuning, allocator)
    out: dict[str, Any] = {
        "steps_per_epoch": len(data.train), "val_batches": len(data.val) if data.val is not None else 0,
        "test_batches": len(data.test) if data.test is not None else 0, "epochs": cfg.epochs,
        "milestones": list(cfg.lr_milestones), "setup_s": setup_s,
        "step_s": steps_of(eager, train_batches[1:]) / max(1, len(train_batches) - 1),
        "eval_batch_s": (evals(model, val_batches) / len(val_batches)) if val_batches else 0.0,
    }
    if compile_backend is not None:
        compiled = runner(torch.compile(model, backend=compile_backend))
        first = steps_of(compiled, train_batches[:1])
        step = steps_of(compiled, train_batches[1:]) / max(1, len(train_batches) - 1)
        eval_net = torch.compile(model, backend=compile_backend)  # the loop's own evaluation wrapper
        first_eval = evals(eval_net, val_batches[:1]) if val_batches else 0.0
        batch = (evals(eval_net, val_batches) / len(val_batches)) if val_batches else 0.0
        out.update(compile_s=max(0.0, first - step) + max(0.0, first_eval - batch), step_compiled_s=step,
                   eval_batch_compiled_s=batch)
    return out


def timing_from(measured: dict[str, Any], startup_s: float) -> RowTiming:
    """A :class:`RowTiming` from :func:`measure_row`'s fields and the measured process start-up."""
    kept = {k: v for k, v in measured.items() if k in RowTiming.__dataclass_fields__}
    kept["milestones"] = tuple(kept.get("milestones") or ())
    return RowTiming(startup_s=startup_s, **kept)


def timing_json(timing: RowTiming) -> str:
    return json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(timing).items()})


# ---------------------------------------------------------------------------------------- assumptions
# What the README's estimate assumes of an H200 before any has run this code: a training
# step at 4 % of the ~790 TFLOP/s bf16 rate of an H200 (small CIFAR convolutions at batch 128
# are launch- and memory-bound), inference at 8 %, 60 s of compilation for the train and eval graphs
# of each row, 30 s of process start-up.
ASSUMED_H200 = {"train_flops_per_s": 0.04 * 790e12, "eval_flops_per_s": 0.08 * 790e12, "compile_s": 60.0,
                "startup_s": 30.0, "eager_step_factor": 1.5}


def assumed_timing(flops: float, *, steps_per_epoch: int = 351, batch: int = 128, eval_batch: int = 500,
                   val_batches: int = 10, test_batches: int = 20, epochs: int = 90,
                   milestones: tuple[int, ...] = (45,), rates: dict[str, float] = ASSUMED_H200) -> RowTiming:
    """A :class:`RowTiming` from a model's forward FLOPs per image and :data:`ASSUMED_H200`'s rates (the
    paper protocol on CIFAR-10: 45,000 training images at batch 128, 5,000 held out, 10,000 test)."""
    step = 3 * flops * batch / rates["train_flops_per_s"]
    eval_batch_s = flops * eval_batch / rates["eval_flops_per_s"]
    factor = rates["eager_step_factor"]
    return RowTiming(startup_s=rates["startup_s"], steps_per_epoch=steps_per_epoch, val_batches=val_batches,
                     test_batches=test_batches, epochs=epochs, milestones=milestones, step_s=step * factor,
                     eval_batch_s=eval_batch_s * factor, compile_s=rates["compile_s"], step_compiled_s=step,
                     eval_batch_compiled_s=eval_batch_s)
