"""``dacnn publish``: a converged reproduction's best weights join the pretrained table.

The best checkpoint a ``dacnn reproduce`` row recorded (``extra.best_weights`` with its sha256; a
pruned row's fine-tuned checkpoint in its run directory) is checked against the record, re-evaluated
on the test split with today's code (it must give the record's test accuracy), written under
``<weights_root>/trained/<model>.<tag>.safetensors`` with a sidecar, and entered in the trained-weights
table (``table``; the package's :data:`dacnn.hub.TRAINED_TABLE` in a checkout) with its size, sha256,
accuracy and the run that made it. ``create_model("<model>.<tag>", pretrained=True)`` and
``dacnn eval --model <model>.<tag> --pretrained`` then find it like any released weights, with
``weights_root`` on the weights search path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dacnn import checkpoint as ckpt
from dacnn.analysis.evaluate import test_accuracy, test_loader
from dacnn.data import DATASETS
from dacnn.errors import CheckpointError, ConfigError
from dacnn.experiments.store import ResultsStore
from dacnn.fileio import atomic_write_text, sha256_file
from dacnn.hub import TRAINED_TABLE, read_trained_table, trained_entry
from dacnn.loading import load_source
from dacnn.train.rundir import best_weights

__all__ = ["find_record", "publish", "retire"]

TAG = re.compile(r"^[a-z0-9][a-z0-9_]*$")
ACCURACY_TOLERANCE = 0.02  # percentage points: two test images of 10,000 (BN folding may flip a tie)


def find_record(
    store: ResultsStore, experiment: str, row: str, seed: int, scale: str = "cpu"
) -> dict[str, Any]:
    """The latest record of ``experiment``/``row``/``seed`` at ``scale``; a clear error if there is none.
    A record without a seed (a prune of a source trained once, or recorded before prune rows ran per
    seed) is found as seed 0."""
    found = [r for r in store.records(experiment, scale)
             if r.get("row") == row and (0 if r.get("seed") is None else r.get("seed")) == seed]
    if not found:
        rows = sorted({f"{r.get('row')}#{r.get('seed')}" for r in store.records(experiment, scale)})
        raise ConfigError(
            f"no {scale} record of {experiment}/{row} seed {seed} in {store.root}; "
            f"recorded: {', '.join(rows) or 'none'}"
        )
    return found[-1]


def _weights_file(record: dict[str, Any]) -> Path:
    """The weights a record names: a trained row's best checkpoint, checked against the sha256 it
    recorded; a pruned row's fine-tuned checkpoint in its run directory (recorded without a digest:
    the accuracy measured again is the check)."""
    extra = record.get("extra") or {}
    where = f"{record['experiment']}/{record['row']}"
    if record.get("kind") == "prune":
        run_dir = record.get("run_dir")
        found = best_weights(run_dir) if run_dir else None
        if found is None or not found.is_file():
            raise CheckpointError(f"{where}: no fine-tuned checkpoint in {record.get('run_dir')} "
                                  "(the run directory is not on this machine)")
        return found
    source = Path(str(extra.get("best_weights", "")))
    if not source.is_file():
        raise CheckpointError(f"{where}: best weights {source} not found "
                              "(the run directory is not on this machine)")
    digest = sha256_file(source)
    if digest != extra.get("best_weights_sha256"):
        raise CheckpointError(f"{source}: sha256 {digest} is not the record's "
                              f"{extra.get('best_weights_sha256')}")
    return source


def publish(
    record: dict[str, Any],
    tag: str,
    *,
    data_dir: str | None = None,
    weights_root: str | Path,
    table: str | Path = TRAINED_TABLE,
    notes: str = "",
) -> dict[str, Any]:
    """Publish ``record``'s best weights as ``<model>.<tag>``; returns the table entry written."""
    if not TAG.match(tag):
        raise ConfigError(f"--tag {tag!r}: use lower-case letters, digits and '_' (e.g. cifar10_cpu)")
    if record.get("dirty"):
        raise ConfigError(
            f"{record['experiment']}/{record['row']}: recorded from a dirty tree; not published"
        )
    extra = record.get("extra") or {}
    source = _weights_file(record)
    model, meta = load_source(source)
    tta = int(meta.get("tta") or 0)
    loader = test_loader(meta, data_dir=data_dir, limit=record.get("test_images"))
    acc = test_accuracy(model, loader, tta)
    if abs(acc - float(record["test_acc"])) > ACCURACY_TOLERANCE:
        raise CheckpointError(
            f"{source}: today's code measures {acc:.2f} % on the test split, the record "
            f"says {record['test_acc']:.2f} %; not published"
        )
    plain = None  # the accuracy without test-time augmentation, where the run used it (6x cheaper to check)
    if tta:
        plain = test_accuracy(model, loader, 0)
        recorded = extra.get("test_acc_no_tta")
        if recorded is None:  # a pruned row records its accuracy with the source's TTA only
            recorded = plain
        elif abs(plain - float(recorded)) > ACCURACY_TOLERANCE:
            raise CheckpointError(
                f"{source}: today's code measures {plain:.2f} % without test-time augmentation, the "
                f"record says {recorded:.2f} %; not published"
            )
    name = f"{record['model']}.{tag}"
    rel = f"trained/{name}.safetensors"
    out = Path(weights_root) / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(meta.get("model_kwargs", {}))
    trained_by = {
        k: record.get(k)
        for k in (
            "experiment",
            "row",
            "seed",
            "scale",
            "config_hash",
            "source_hash",
            "git_commit",
            "command",
            "finished",
        )
    }
    trained_by["machine"] = (record.get("machine") or {}).get("cpu")
    ckpt.save_weights(
        model,
        out,
        {
            "model": record["model"],
            "model_kwargs": kwargs,
            "dataset": record["dataset"],
            "normalize": meta.get("normalize", True),
            "pad_to": meta.get("pad_to"),
            "tta": tta,
            "pretrained": name,
            "trained_by": trained_by,
        },
    )
    entry = trained_entry(
        model=record["model"], tag=tag, file=rel, sha256=sha256_file(out), bytes=out.stat().st_size,
        dataset=record["dataset"], accuracy=round(float(record["test_acc"]), 2), model_kwargs=kwargs,
        normalize=meta.get("normalize", True), pad_to=meta.get("pad_to"),
        input_size=list(DATASETS[record["dataset"]].input_size(meta.get("pad_to"))), trained_by=trained_by,
        unique_params=record.get("unique_params"), tta=tta,
        train_cpu_seconds=extra.get("cpu_time"), notes=notes,
        **({"accuracy_no_tta": round(float(recorded), 2)} if plain is not None else {}),
    )
    entries = [e for e in read_trained_table(table) if (e["model"], e["tag"]) != (entry["model"], tag)]
    entries.append(entry)
    entries.sort(key=lambda e: (e["model"], e["tag"]))
    atomic_write_text(table, json.dumps(entries, indent=1, sort_keys=True) + "\n")
    return entry


def retire(name: str, *, weights_root: str | Path, table: str | Path = TRAINED_TABLE) -> dict[str, Any]:
    """Take ``<model>.<tag>`` out of the trained-weights table and delete its file and sidecar under
    ``weights_root`` (weights another published model dominates); returns the entry removed."""
    entries = read_trained_table(table)
    found = [e for e in entries if f"{e['model']}.{e['tag']}" == name]
    if not found:
        names = ", ".join(f"{e['model']}.{e['tag']}" for e in entries) or "none"
        raise ConfigError(f"--retire {name}: not in the trained-weights table {table} (it has: {names})")
    kept = [e for e in entries if e not in found]
    atomic_write_text(table, json.dumps(kept, indent=1, sort_keys=True) + "\n")
    weights = Path(weights_root) / found[0]["file"]
    for path in (weights, weights.with_suffix(".json")):
        path.unlink(missing_ok=True)
    return found[0]
