"""Run one planned row and build its results record (used by :func:`dacnn.experiments.runner.reproduce`).

A ``train`` row trains (or resumes, or reads back a finished run directory), evaluates the selected
model on the test split (or its seeded subset), counts FLOPs and per-use parameters of the model,
and writes it all into one record. A run that diverges (nan/inf loss) is a result too: its best
checkpoint before the divergence is tested and the record says so. ``filters`` rows add Figure 7's
activation maximisation; ``prune`` rows prune and fine-tune another row's model (:mod:`dacnn.prune`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from dacnn.analysis.activation_max import activation_maximisation, save_filters
from dacnn.analysis.evaluate import test_accuracy, test_loader
from dacnn.counting import count_flops, count_params
from dacnn.data import load_dataset
from dacnn.errors import ConfigError
from dacnn.experiments.planning import PlannedRow, RunOptions
from dacnn.experiments.provenance import (
    dataset_checksum,
    device_description,
    machine_description,
    now_utc,
    source_hash,
    tree_state,
)
from dacnn.experiments.store import MACHINE_KEYS, ResultsStore
from dacnn.fileio import sha256_file
from dacnn.loading import load_source
from dacnn.prune import prune_run
from dacnn.train import TrainingDiverged, train
from dacnn.train.builders import build_model, dataset_info, model_input_hw, model_kwargs, resolve_device
from dacnn.train.config import TrainConfig, config_from_dict
from dacnn.train.rundir import RunLock, best_weights, has_checkpoint, is_finished, read_history, read_result

__all__ = ["run_training_row", "run_prune_row", "base_record", "model_figures"]


def _machine_config(p: PlannedRow, opts: RunOptions) -> TrainConfig:

    assert p.run_dir is not None
    settings = {**p.train, "out_dir": str(p.run_dir.parent), "run_name": p.run_dir.name}
    if opts.data_dir is not None:
        settings["data_dir"] = opts.data_dir
    if opts.device is not None:
        settings["device"] = opts.device
    if opts.threads is not None:
        settings["threads"] = opts.threads
    return config_from_dict(settings, source=f"{p.spec.name}/{p.row.id}")


def _train(p: PlannedRow, cfg: TrainConfig, opts: RunOptions, on_epoch: Any = None) -> dict[str, Any]:
    """Train (or resume, or read back) the row's run under its slot's lock (a second process on the
    same run fails at once instead of clearing it); returns the TrainResult as a dict."""
    assert p.run_dir is not None
    with RunLock.slot(p.run_dir):
        return _train_locked(p, cfg, opts, on_epoch)


def _train_locked(p: PlannedRow, cfg: TrainConfig, opts: RunOptions,
                  on_epoch: Any = None) -> dict[str, Any]:

    run_dir = p.run_dir
    if is_finished(run_dir):
        opts.say(f"  finished run found in {run_dir}")
        return read_result(run_dir)
    interrupted = has_checkpoint(run_dir)
    if interrupted and opts.resume:
        opts.say(f"  resuming the interrupted run in {run_dir}")
        return train(cfg, resume=run_dir, verbose=opts.verbose, on_epoch=on_epoch).to_dict()
    if interrupted and not opts.force:
        raise ConfigError(f"{p.spec.name}/{p.row.id}: an interrupted run is in {run_dir}; pass --resume to "
                          "continue it (or --force to start it again)")
    if run_dir.exists():
        shutil.rmtree(run_dir)  # no checkpoint yet (nothing to resume), or --force
    return train(cfg, verbose=opts.verbose, on_epoch=on_epoch).to_dict()


def _diverged_result(p: PlannedRow, cfg: TrainConfig) -> dict[str, Any]:
    """What a run that stopped on nan/inf leaves: its epochs so far and its best checkpoint, if any."""

    assert p.run_dir is not None
    history = read_history(p.run_dir)
    scored = [h for h in history if h.get("val_acc") is not None]
    best = max(scored, key=lambda h: h["val_acc"]) if scored else None
    info = dataset_info(cfg.dataset)
    counts = count_params(build_model(cfg.model, model_kwargs(cfg, info.num_classes, info.image_size[2])))
    has_best = (p.run_dir / "checkpoints" / "best.json").is_file()
    return {"run_dir": str(p.run_dir), "best_epoch": best["epoch"] if best and has_best else None,
            "best_val_acc": best["val_acc"] if best else None, "test_acc": None,
            "unique_params": counts.unique, "wall_time": history[-1]["wall_time"] if history else None,
            "history": history}


def model_figures(cfg: TrainConfig) -> dict[str, Any]:
    """FLOPs, per-use parameters (every call counted) and input size of the row's model."""
    import torch


    info = dataset_info(cfg.dataset)
    kwargs = model_kwargs(cfg, info.num_classes, info.image_size[2])
    model = build_model(cfg.model, kwargs)
    input_size = info.input_size(info.pad_for(model_input_hw(cfg.model), cfg.pad_to))
    per_use = count_params(model, torch.zeros(1, *input_size)).per_use
    return {"model_kwargs": kwargs, "flops": count_flops(model, input_size), "per_use_params": per_use,
            "input_size": input_size, "mean": info.mean, "std": info.std}


def _split_sizes(cfg: TrainConfig, test_subset: int | None) -> tuple[int, int, int]:

    n_train = len(load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir))
    train = n_train - cfg.val_size
    if cfg.train_subset is not None:
        train = min(train, cfg.train_subset)
    n_test = len(load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir))
    return train, cfg.val_size, min(n_test, test_subset) if test_subset else n_test


def _test_subset_accuracy(run_dir: Path, data_dir: str | None, n: int) -> tuple[float, float | None]:
    """Test accuracy of a run's selected model on the first ``n`` test images, with the run's
    test-time augmentation, and without it (``None`` when the run has none)."""
    model, meta = load_source(run_dir)
    loader = test_loader(meta, data_dir=data_dir, limit=n)
    tta = int(meta.get("tta") or 0)
    return test_accuracy(model, loader, tta), (test_accuracy(model, loader, 0) if tta else None)


def _curve(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc")
    return [{k: h.get(k) for k in keys} for h in history]


_checksums: dict[tuple[str, str | None], str | None] = {}


def _checksum(name: str, data_dir: str | None) -> str | None:
    if (name, data_dir) not in _checksums:
        _checksums[(name, data_dir)] = dataset_checksum(name, data_dir)
    return _checksums[(name, data_dir)]


def base_record(p: PlannedRow, opts: RunOptions) -> dict[str, Any]:
    """The provenance half of a record: what ran, from which source, how, where and when."""
    state = tree_state()
    return {
        "experiment": p.spec.name, "row": p.row.id, "label": p.row.label, "scale": p.resolved.scale,
        "kind": p.row.kind, "seed": p.seed, "config_hash": p.chash, "source_hash": source_hash(),
        "git_commit": state.commit, "dirty": {"diff_sha256": state.diff_sha256} if state.dirty else None,
        "command": opts.command, "machine": machine_description(), "finished": now_utc(), "reused_from": None,
        "extra": {},
    }


def _run_fields(p: PlannedRow, cfg: TrainConfig) -> dict[str, Any]:
    """The record fields a row's run fixes before it trains: model, data, device and figures."""
    figures = model_figures(cfg)
    n_train, n_val, n_test = _split_sizes(cfg, p.resolved.test_subset)
    return {
        "model": cfg.model, "model_kwargs": figures["model_kwargs"], "dataset": cfg.dataset,
        "dataset_checksum": _checksum(cfg.dataset, cfg.data_dir), "train_images": n_train,
        "val_images": n_val, "test_images": n_test,
        "device": device_description(str(resolve_device(cfg.device))),
        "torch_version": _torch_version(), "epochs": cfg.epochs,
        "per_use_params": figures["per_use_params"], "flops": figures["flops"],
        "config": {k: v for k, v in p.train.items() if k not in MACHINE_KEYS},
    }


def _partial_writer(p: PlannedRow, cfg: TrainConfig, opts: RunOptions, store: ResultsStore) -> Any:
    """``on_epoch`` of a run with ``opts.partial_records``: after every epoch its record so far (curve,
    best validation epoch, no test accuracy, ``extra.partial``) replaces its line in the store's
    partial file. A failed write is said and training goes on."""
    fixed: dict[str, Any] = {}

    def write(history: list[dict[str, Any]]) -> None:
        if not fixed:
            info = dataset_info(cfg.dataset)
            model = build_model(cfg.model, model_kwargs(cfg, info.num_classes, info.image_size[2]))
            fixed.update(_run_fields(p, cfg), test_acc=None, test_error=None,
                         unique_params=count_params(model).unique, run_dir=str(p.run_dir))
        scored = [h for h in history if h.get("val_acc") is not None]
        best = max(scored, key=lambda h: h["val_acc"]) if scored else None
        record = base_record(p, opts)
        record.update(fixed)
        record.update({"best_epoch": best["epoch"] if best else None,
                       "best_val_acc": best["val_acc"] if best else None,
                       "wall_time": history[-1].get("wall_time") if history else None,
                       "curve": _curve(history)})
        record["extra"]["partial"] = {"epochs_done": len(history), "epochs": cfg.epochs}
        if opts.note:
            record["extra"]["note"] = opts.note
        try:
            path = store.write_partial(record)
        except OSError as exc:
            opts.say(f"  could not write the partial record ({exc.filename or ''}: {exc.strerror or exc}); "
                     "training goes on")
            return
        opts.say(f"  partial record ({len(history)}/{cfg.epochs} epochs) -> {path}")

    return write


def run_training_row(p: PlannedRow, opts: RunOptions, store: ResultsStore) -> dict[str, Any]:

    cfg = _machine_config(p, opts)
    start = time.perf_counter()
    diverged = None
    on_epoch = _partial_writer(p, cfg, opts, store) if opts.partial_records else None
    try:
        result = _train(p, cfg, opts, on_epoch)
    except TrainingDiverged as exc:  # a result in itself (Table 1 without BatchNorm): keep the best model
        diverged = str(exc)
        opts.say(f"  diverged: {diverged}")
        result = _diverged_result(p, cfg)
    test_acc, test_acc_no_tta = result.get("test_acc"), result.get("test_acc_no_tta")
    if p.resolved.test_subset or (diverged and result.get("best_epoch") is not None):
        n = p.resolved.test_subset or 10**9
        test_acc, test_acc_no_tta = _test_subset_accuracy(Path(result["run_dir"]), cfg.data_dir, n)
    fields = _run_fields(p, cfg)
    record = base_record(p, opts)
    record.update({
        **fields, "best_epoch": result.get("best_epoch"),
        "best_val_acc": result.get("best_val_acc"), "test_acc": test_acc,
        "test_error": None if test_acc is None else 100.0 - test_acc,
        "unique_params": result["unique_params"], "wall_time": result.get("wall_time"),
        "run_dir": result["run_dir"], "curve": _curve(result.get("history") or []),
    })
    if diverged:
        record["extra"]["diverged"] = diverged
    if opts.note:
        record["extra"]["note"] = opts.note
    record["extra"].update(_best_checkpoint(Path(result["run_dir"])))
    if result.get("cpu_time") is not None:  # CPU seconds of the training process (all threads)
        record["extra"]["cpu_time"] = result["cpu_time"]
    if result.get("tta"):
        record["extra"].update(tta=result["tta"], test_acc_no_tta=test_acc_no_tta)
    if p.row.kind == "filters":
        record["extra"].update(_run_filters(p, model_figures(cfg), opts, store))
    record["extra"]["reproduce_seconds"] = time.perf_counter() - start
    return record


def _run_filters(p: PlannedRow, figures: dict[str, Any], opts: RunOptions,
                 store: ResultsStore) -> dict[str, Any]:

    assert p.run_dir is not None
    model, _ = load_source(p.run_dir)
    settings = dict(p.resolved.filters)
    images, layers = activation_maximisation(model, figures["input_size"], figures["mean"], figures["std"],
                                             **settings)
    relative = Path("artifacts") / p.spec.name / f"{p.row.id}-{p.chash}.npz"
    save_filters(store.scale_dir(p.resolved.scale) / relative, images, layers)
    opts.say(f"  filter visualisation: {len(layers)} layers x {images.shape[1]} filters -> {relative}")
    return {"artifact": relative.as_posix(), "layers": layers, "filters": settings}


def run_prune_row(p: PlannedRow, source: dict[str, Any], opts: RunOptions) -> dict[str, Any]:

    src_dir = Path(source["run_dir"])
    if not (src_dir / "checkpoints").is_dir():
        raise ConfigError(f"{p.spec.name}/{p.row.id}: the trained model of row {p.row.prune['source']!r} "
                          f"is gone ({src_dir}); re-train it with --force --rows {p.row.prune['source']}")
    settings = {k: v for k, v in p.runner.items() if k not in ("kind", "source", "test_subset")}
    start = time.perf_counter()
    out = prune_run(src_dir, ratio=float(settings["ratio"]), epochs=int(settings.get("epochs", 0)),
                    scope=settings.get("scope", "global"), lr=settings.get("lr"),
                    train_subset=settings.get("train_subset"), limit=p.resolved.test_subset,
                    data_dir=opts.data_dir, output=p.run_dir, verbose=opts.verbose)
    record = base_record(p, opts)
    test_acc = out["acc_after"]
    extra_keys = ("ratio", "scope", "epochs", "lr", "acc_before", "acc_pruned", "acc_drop", "nonzero_params",
                  "unique_params", "prunable_kept", "prunable_total", "compression")
    record.update({
        "model": out["model"], "model_kwargs": source.get("model_kwargs"), "dataset": out.get("dataset"),
        "dataset_checksum": source.get("dataset_checksum"), "train_images": source.get("train_images"),
        "val_images": source.get("val_images"), "test_images": source.get("test_images"),
        "device": source.get("device"), "torch_version": _torch_version(), "epochs": out["epochs"],
        "best_epoch": None, "best_val_acc": None, "test_acc": test_acc, "test_error": 100.0 - test_acc,
        "unique_params": out["nonzero_params"], "per_use_params": None, "flops": source.get("flops"),
        "wall_time": time.perf_counter() - start, "run_dir": out["output"],
        "curve": out.get("history") or [], "config": {"source_row": p.row.prune["source"], **settings},
        "extra": {k: out.get(k) for k in extra_keys} | {"source_config_hash": p.runner["source"]},
    })
    source_cpu = (source.get("extra") or {}).get("cpu_time")
    if source_cpu is not None and out.get("finetune_cpu_time") is not None:
        # what the pruned model cost: the source's training and the fine-tuning (CPU seconds)
        record["extra"].update(cpu_time=source_cpu + out["finetune_cpu_time"],
                               finetune_cpu_time=out["finetune_cpu_time"])
    return record


def _best_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The weights file of the best checkpoint, its size and sha256 (what a pretrained entry names)."""
    path = best_weights(run_dir)
    if path is None:
        return {}
    return {"best_weights": str(path), "best_weights_bytes": path.stat().st_size,
            "best_weights_sha256": sha256_file(path)}


def _torch_version() -> str:
    import torch

    return torch.__version__
