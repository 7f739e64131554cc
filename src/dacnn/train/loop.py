"""The training loop: ``train(config) -> TrainResult``.

One epoch (:meth:`_Run.run`, top to bottom) = shuffle (a function of seed and epoch), for each batch:
set lr, forward/backward, check the loss is finite, clip, step, update the weight averages (EMA,
lookahead), maybe checkpoint; then validate, log a line, save the epoch's checkpoint. The model is
selected on the validation split (best accuracy) and only that model is evaluated on the test split,
once, at the end.

Resuming restores weights, optimizer, EMA, position (epoch, batches done) and RNG states: the
loader's order and augmentation are functions of (seed, epoch, batch), so the resumed run positions
the loader at the batch it stopped at (``set_epoch(epoch, start_batch)``) and continues bitwise as the
uninterrupted run would (CPU, deterministic mode, same thread count).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dacnn import checkpoint as ckpt
from dacnn.counting import count_params
from dacnn.errors import CheckpointError, DacnnError
from dacnn.runtime import idle_cores, warn_slow_amp
from dacnn.train.builders import (
    LRSchedule,
    build_data,
    build_model,
    build_optimizer,
    dataset_info,
    device_for_rank,
    model_input_hw,
    model_kwargs,
    resolve_device,
    seed_everything,
    set_deterministic,
)
from dacnn.train.config import TrainConfig, dump_yaml
from dacnn.train.distributed import (
    DistContext,
    all_reduce_sum,
    cleanup,
    init_distributed,
    wrap_ddp,
)
from dacnn.train.ema import Lookahead, ModelEMA
from dacnn.train.engine import StepRunner, evaluate
from dacnn.train.optim import (
    freeze_norm_scales,
    norms_after_shared_kernels,
    set_bn_momentum,
    thaw_norm_scales,
)
from dacnn.train.rundir import find_run_dir, open_run
from dacnn.train.runlog import RunLog, format_duration, progress_bar
from dacnn.train.speed import resolve_speed
from dacnn.train.whitening import WHITENING_IMAGES, init_patch_whitening

__all__ = ["train", "TrainResult", "TrainingDiverged", "find_run_dir"]


class TrainingDiverged(DacnnError):
    """The loss became nan or inf; the run stopped and kept its last good checkpoint."""


@dataclass
class TrainResult:
    """What a finished run reports (also written to ``<run>/result.json``)."""

    run_dir: str | None
    model: str
    dataset: str
    epochs: int
    best_epoch: int | None
    best_val_acc: float | None
    test_acc: float | None
    test_loss: float | None
    unique_params: int
    per_use_params: int
    wall_time: float
    cpu_time: float | None = None  # CPU seconds of the training process, all threads
    tta: int = 0  # test-time augmentation level of test_acc (TrainConfig.tta)
    test_acc_no_tta: float | None = None  # with tta: the same model without it
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary_line(self) -> str:
        test = f"test accuracy {self.test_acc:.2f} %" if self.test_acc is not None else "no test evaluation"
        val = ""
        if self.best_val_acc is not None and self.best_epoch is not None:
            val = f" (val {self.best_val_acc:.2f} % at epoch {self.best_epoch + 1})"
        return (f"{test}{val} | unique params {self.unique_params:,} | "
                f"wall time {format_duration(self.wall_time)}")


class _Running:
    """Sums over the current epoch (device tensors: no synchronisation per step)."""

    def __init__(self, device: torch.device, saved: dict[str, Any] | None = None) -> None:
        saved = saved or {}
        self.loss = torch.tensor(saved.get("loss_sum", 0.0), dtype=torch.float64, device=device)
        self.correct = torch.tensor(saved.get("correct", 0), dtype=torch.int64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # since the last check
        self.seen = int(saved.get("seen", 0))
        self.seconds = float(saved.get("train_seconds", 0.0))

    def add(self, loss: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        self.nonfinite |= ~torch.isfinite(loss)
        self.loss += loss.double() * n
        self.correct += correct
        self.seen += n

    def state(self) -> dict[str, Any]:
        return {"loss_sum": self.loss.item(), "correct": int(self.correct.item()), "seen": self.seen,
                "train_seconds": self.seconds}


def train(cfg: TrainConfig, *, resume: str | Path | None = None, verbose: bool = True,
          init_weights: str | Path | None = None, on_optimizer: OptimizerHook | None = None,
          meta: dict[str, Any] | None = None, on_epoch: EpochHook | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.dataset``; ``resume`` (a run directory) continues a run.

    ``init_weights`` (a weights file of the same model) starts from trained weights instead of the
    random init (fine-tuning, e.g. ``dacnn prune``); ``on_optimizer(model, optimizer)`` is called once
    the optimizer exists, also on resume (e.g. to register a step hook); ``meta`` is added to every
    saved weights file's sidecar; ``on_epoch(history)`` is called (on rank 0) after each epoch's
    checkpoint with the per-epoch records so far (e.g. to write a partial result). Process-wide
    torch settings the run changes (threads, deterministic mode) are restored after it.
    """
    device = resolve_device(cfg.device)
    ctx = init_distributed(device)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    start = _Start(init_weights, on_optimizer, dict(meta or {}), on_epoch)
    run, clean_exit = None, False
    try:
        run = _Run(cfg, device_for_rank(device, ctx), ctx, resume, verbose, start)
        result = run.run()
        clean_exit = True
        return result
    finally:
        if run is not None and run.lock is not None:
            run.lock.release()
        del run
        cleanup(ctx, clean_exit=clean_exit)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


OptimizerHook = Callable[[nn.Module, torch.optim.Optimizer], Any]
EpochHook = Callable[[list[dict[str, Any]]], Any]


@dataclass
class _Start:
    """What :func:`train` starts from besides the config (see its docstring)."""

    init_weights: str | Path | None = None
    on_optimizer: OptimizerHook | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    on_epoch: EpochHook | None = None


class _Run:
    """One training run: every part of it is built here, then :meth:`run` is the epoch loop."""

    def __init__(self, cfg: TrainConfig, device: torch.device, ctx: DistContext,
                 resume: str | Path | None, verbose: bool, given: _Start | None = None) -> None:
        given = given or _Start()
        self.on_epoch = given.on_epoch
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.elapsed_before, self.cpu_before = 0.0, 0.0  # of the run's earlier parts (resume)
        self.cfg, self.device, self.ctx = cfg, device, ctx
        self.say = print if verbose and ctx.is_main else (lambda *a, **k: None)
        # made atomically and locked before any work; a resume is checked (rundir.resume_point)
        self.run_dir, self.lock, self.resume_state = open_run(cfg.to_dict(), resume, ctx, self.say)
        self.ckpt_dir = self.run_dir / "checkpoints"
        set_deterministic(cfg.deterministic, self.device)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        elif device.type == "cpu" and not cfg.deterministic:  # a bitwise resume needs a fixed count
            torch.set_num_threads(max(1, idle_cores() // ctx.world))  # ranks share the cores
        seed_everything(cfg.seed)
        info = dataset_info(cfg.dataset)
        self.kwargs = model_kwargs(cfg, info.num_classes, info.image_size[2])
        self.speed = resolve_speed(cfg, device)
        warn_slow_amp(device, self.speed.amp)
        self.model = self.build_model(given.init_weights)
        if given.init_weights is not None:  # replaces the random init: draw as if none was made
            seed_everything(cfg.seed)
        if cfg.bn_momentum is not None:
            set_bn_momentum(self.model, cfg.bn_momentum)
        self.data = build_data(cfg, device, model_input_hw(cfg.model), ctx)
        if cfg.freeze_norm_scale:
            freeze_norm_scales(self.model)
        if cfg.shared_norm_scale:  # DACNN's free per-layer BatchNorm: its scale learns whatever froze it
            example = torch.zeros(1, *info.input_size(self.data.pad_to), device=device)
            thaw_norm_scales(self.model, norms_after_shared_kernels(self.model, example))
        # the frozen whitening conv (its bias trains for whiten_bias_epochs), set from the data
        self.whitened = (init_patch_whitening(self.model, self.data.train.plain_images(WHITENING_IMAGES))
                         if cfg.whiten else None)
        self.lookahead: Lookahead | None = None  # made at epoch lookahead_start (the model is the average)
        self.lookahead_start = int(0.3 * cfg.epochs) if cfg.lookahead else None
        if ctx.enabled:
            torch.manual_seed(cfg.seed * 1000 + ctx.rank)  # own dropout noise per rank
        self.ema = ModelEMA(self.model, decay=cfg.ema) if cfg.ema is not None else None
        self.optimizer = build_optimizer(self.model, cfg)
        if given.on_optimizer is not None:
            given.on_optimizer(self.model, self.optimizer)
        self.input_size = info.input_size(self.data.pad_to)
        train_model = wrap_ddp(self.model, ctx, device, self.input_size)
        eval_model = self.ema.module if self.ema is not None else self.model
        if self.speed.compile:
            train_model, eval_model = torch.compile(train_model), torch.compile(eval_model)
        self.eval_model = eval_model
        self.runner = StepRunner(train_model, self.optimizer, device, amp=self.speed.amp,
                                 label_smoothing=cfg.label_smoothing, clip_grad=cfg.clip_grad,
                                 channels_last=self.speed.channels_last)
        self.steps_per_epoch = len(self.data.train)
        self.schedule = LRSchedule(cfg, self.steps_per_epoch)
        self.log = RunLog(self.run_dir, enabled=ctx.is_main, tensorboard=cfg.tensorboard)
        self.meta = {"model": cfg.model, "model_kwargs": self.kwargs, "dataset": cfg.dataset,
                     "normalize": cfg.normalize, "pad_to": self.data.pad_to, "tta": cfg.tta, **given.meta}
        self.best: dict[str, Any] = {"val_acc": None, "epoch": None}
        self.check_every = (cfg.nan_check_every if cfg.nan_check_every is not None
                            else int(device.type != "cuda"))

    def build_model(self, weights: str | Path | None = None) -> nn.Module:
        """The run's model on its device and memory format, with ``weights`` loaded if given: the
        trained model, and the one the test evaluates."""
        model = build_model(self.cfg.model, self.kwargs).to(self.device)
        if weights is not None:
            ckpt.load_weights(model, weights, self.device)
        return model.to(memory_format=torch.channels_last) if self.speed.channels_last else model

    def restore(self, state: dict[str, Any]) -> tuple[int, int, int]:
        """Load a training state; returns (start epoch, batches done in it, global step)."""
        ckpt.load_weights(self.model, self.ckpt_dir / state["weights"], self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if state.get("ema_weights") is None:
                raise CheckpointError(f"{self.ckpt_dir}: the run has no EMA weights; drop --ema to resume it")
            ckpt.load_weights(self.ema.module, self.ckpt_dir / state["ema_weights"], self.device)
            self.ema.updates = state["ema_updates"]
        if self.runner.scaler is not None and state.get("scaler"):
            self.runner.scaler.load_state_dict(state["scaler"])
        self.best = dict(state["best"])
        self.elapsed_before = float(state["wall_time"])
        self.cpu_before = float(state.get("cpu_time", 0.0))
        epoch = int(state["epoch"])
        start, skip = (epoch + 1, 0) if state["epoch_done"] else (epoch, int(state["batches_done"]))
        self.log.resume(start)
        self.say(f"resuming {self.run_dir} at epoch {start + 1}, batch {skip} (step {state['global_step']})")
        return start, skip, int(state["global_step"])

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Per epoch: position the loader, set the lr, step, average, check, then validate and save."""
        cfg, state = self.cfg, self.resume_state
        epoch, batch, step = self.restore(state) if state is not None else (0, 0, 0)
        self.announce()
        while epoch < cfg.epochs:
            running = _Running(self.device, state["running"] if state is not None and batch else None)
            self.data.train.set_epoch(epoch, start_batch=batch)  # resumed: from the batch it stopped at
            if state is not None:
                ckpt.restore_rng(state["rng"])  # the global generators (dropout) as they were saved
                state = None
            self.begin_epoch(epoch)
            self.model.train()
            tick = time.perf_counter()
            for x, y in self.batches(epoch, batch):
                self.schedule.apply(self.optimizer, epoch, batch)
                loss, correct = self.runner.forward_backward(x, y)
                will_save = cfg.ckpt_every_steps and (step + 1) % cfg.ckpt_every_steps == 0
                if (self.check_every and (step + 1) % self.check_every == 0) or will_save \
                        or batch + 1 == self.steps_per_epoch:
                    self.check_finite(loss, running, epoch, batch, step)
                self.runner.apply()
                self.average(step + 1)
                running.add(loss, correct, y.shape[0])  # this rank's images; summed over ranks once
                batch, step = batch + 1, step + 1
                if will_save and batch < self.steps_per_epoch:  # the epoch's end saves anyway
                    running.seconds += time.perf_counter() - tick
                    self.save(epoch, batch, step, running, epoch_done=False)
                    tick = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            running.seconds += time.perf_counter() - tick
            self.end_epoch(epoch, step, running)
            epoch, batch = epoch + 1, 0
        return self.finish()

    def announce(self) -> None:
        """Write the resolved config (on resume: with any changed settings) and say what runs."""
        cfg = self.cfg
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_text(self.run_dir / "config.yaml", dump_yaml(cfg))
        self.say(f"run {self.run_dir}: {cfg.model} on {cfg.dataset} ({self.data.train_size} train images, "
                 f"{self.steps_per_epoch} steps/epoch, {count_params(self.model).unique:,} unique params, "
                 f"{self.device}{f', {self.ctx.world} processes' if self.ctx.enabled else ''}, "
                 f"{self.speed.describe()})")

    def batches(self, epoch: int, first: int) -> Any:
        """The epoch's batches from ``first`` on, with a progress bar on the main process."""
        bar = progress_bar(self.steps_per_epoch, f"epoch {epoch + 1}/{self.cfg.epochs}", self.ctx.is_main)
        if bar is None:
            yield from self.data.train
            return
        bar.update(first)
        for item in self.data.train:
            yield item
            bar.update(1)
        bar.close()

    def begin_epoch(self, epoch: int) -> None:
        """The whitening bias trains for its epochs only; the lookahead average starts at its epoch."""
        if self.whitened is not None and self.whitened.bias is not None:
            self.whitened.bias.requires_grad_(epoch < self.cfg.whiten_bias_epochs)
        if self.lookahead_start is not None and epoch >= self.lookahead_start and self.lookahead is None:
            self.lookahead = Lookahead(self.model)

    def average(self, step: int) -> None:
        """The weight averages after optimizer step ``step``: the EMA, the lookahead every few steps."""
        if self.ema is not None:
            self.ema.update(self.model)
        if self.lookahead is not None and step % Lookahead.EVERY == 0:
            self.lookahead.update(self.model, Lookahead.decay(step, self.schedule.total))

    def end_epoch(self, epoch: int, step: int, running: _Running) -> None:
        """Take the lookahead average, validate, log the epoch and save its checkpoint."""
        if self.lookahead is not None:
            self.lookahead.copy_back(self.model)
        val = evaluate(self.eval_model, self.data.val, self.device, ctx=self.ctx, amp=self.speed.amp,
                       channels_last=self.speed.channels_last) if self.data.val is not None else None
        if val is not None and not math.isfinite(val.loss):
            self.diverged(f"validation loss became {val.loss} after epoch {epoch + 1}")
        is_best = val is None or self.best["val_acc"] is None or val.acc > self.best["val_acc"]
        if is_best:
            self.best = {"val_acc": val.acc if val else None, "epoch": epoch}
        sums = [running.loss.item(), float(running.correct.item()), float(running.seen)]
        train_loss, train_correct, seen = all_reduce_sum(sums, self.ctx, self.device)
        record = {
            "epoch": epoch, "step": step, "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": train_loss / max(seen, 1), "train_acc": 100.0 * train_correct / max(seen, 1),
            "val_loss": val.loss if val else None, "val_acc": val.acc if val else None,
            "images_per_s": seen / max(running.seconds, 1e-9), "epoch_train_s": running.seconds,
            "wall_time": self.elapsed(), "cpu_time": self.cpu_elapsed(),
        }
        self.log.log_epoch(record)
        self.say(self.epoch_line(record))
        self.save(epoch, self.steps_per_epoch, step, running, epoch_done=True, is_best=is_best)
        if self.on_epoch is not None and self.ctx.is_main:
            self.on_epoch(list(self.log.records))

    # ------------------------------------------------------------------ checkpoints
    def save(self, epoch: int, batches_done: int, step: int, running: _Running, *, epoch_done: bool,
             is_best: bool = False) -> None:
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):  # never save a broken model
            self.diverged(f"the weights or BatchNorm statistics are no longer finite at step {step}")
        if not self.ctx.is_main:
            return
        state = {
            "epoch": epoch, "batches_done": batches_done, "epoch_done": epoch_done, "global_step": step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.runner.scaler.state_dict() if self.runner.scaler is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else None,
            "schedule": {"kind": self.schedule.kind, "lr": self.optimizer.param_groups[0]["lr"]},
            "rng": ckpt.capture_rng(), "best": self.best, "running": running.state(),
            "wall_time": self.elapsed(), "cpu_time": self.cpu_elapsed(), "config": self.cfg.to_dict(),
            "torch_version": str(torch.__version__),
        }
        meta = {**self.meta, "epoch": epoch, "global_step": step}
        ckpt.save_checkpoint(self.ckpt_dir, model=self.model,
                             ema_model=self.ema.module if self.ema is not None else None,
                             state=state, meta=meta, is_best=is_best, keep=self.cfg.keep_checkpoints)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def cpu_elapsed(self) -> float:
        """CPU seconds of this process (all its threads) over the run, resumed parts included."""
        return self.cpu_before + time.process_time() - self.cpu_start

    def check_finite(self, loss: torch.Tensor, running: _Running, epoch: int, batch: int, step: int) -> None:
        """One host read of the loss (and the device-side flag of the steps since the last check)."""
        earlier = bool(running.nonfinite)
        bad = 0.0 if bool(torch.isfinite(loss)) and not earlier else 1.0
        if self.ctx.enabled:
            bad = all_reduce_sum([bad], self.ctx, self.device)[0]
        if bad:
            what = "nan/inf after the last check, by" if earlier else f"{loss.item()} at"
            self.diverged(f"loss became {what} epoch {epoch + 1}, batch {batch + 1}/{self.steps_per_epoch} "
                          f"(step {step + 1})")

    def diverged(self, what: str) -> None:
        last = self.ckpt_dir / "last.json"
        self.log.truncate(ckpt.completed_epochs(self.ckpt_dir))  # the logs keep what the checkpoint has
        kept = f"the last good checkpoint is kept ({last})" if last.exists() else "no checkpoint was written"
        raise TrainingDiverged(f"{what}; training stopped and {kept}. Lower --lr (now {self.cfg.lr:g}) "
                               "or set --clip-grad.")

    def epoch_line(self, r: dict[str, Any]) -> str:
        val = f"  val loss {r['val_loss']:.4f} acc {r['val_acc']:5.2f} %" if r["val_acc"] is not None else ""
        return (f"epoch {r['epoch'] + 1:>3}/{self.cfg.epochs}  train loss {r['train_loss']:.4f} "
                f"acc {r['train_acc']:5.2f} %{val}  lr {r['lr']:.3g}  {r['images_per_s']:.0f} img/s  "
                f"{format_duration(r['wall_time'])}")

    def finish(self) -> TrainResult:
        """Test the selected (best-validation) model once, write ``result.json``."""
        cfg = self.cfg
        counts = count_params(self.model)
        test = plain = None
        if self.data.test is not None and self.ctx.is_main:
            pointer = ckpt.read_pointer(self.ckpt_dir, "best")
            selected = self.build_model(self.ckpt_dir / pointer["eval_weights"])
            common = {"amp": self.speed.amp, "channels_last": self.speed.channels_last}
            test = evaluate(selected, self.data.test, self.device, tta=cfg.tta, **common)
            if cfg.tta:
                plain = evaluate(selected, self.data.test, self.device, **common)
        self.ctx.barrier()
        result = TrainResult(
            run_dir=str(self.run_dir), model=str(cfg.model), dataset=str(cfg.dataset), epochs=cfg.epochs,
            best_epoch=self.best["epoch"], best_val_acc=self.best["val_acc"],
            test_acc=test.acc if test else None, test_loss=test.loss if test else None,
            unique_params=counts.unique, per_use_params=counts.per_use, wall_time=self.elapsed(),
            cpu_time=self.cpu_elapsed(), tta=cfg.tta, test_acc_no_tta=plain.acc if plain else None,
            history=list(self.log.records),
        )
        self.log.write_result({k: v for k, v in result.to_dict().items() if k != "history"})
        self.log.close()
        self.say(result.summary_line())
        return result
