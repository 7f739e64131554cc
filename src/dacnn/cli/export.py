"""``dacnn export``, ``dacnn inspect`` and ``dacnn prune``: compress, look inside, prune."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from dacnn.analysis.evaluate import test_accuracy, test_loader
from dacnn.compact_format import DTYPES, load_exported
from dacnn.counting import count_params
from dacnn.data import DATASETS
from dacnn.errors import ConfigError
from dacnn.export.compact import export_safetensors
from dacnn.export.inspect import format_report, inspect_file
from dacnn.export.onnx_export import OnnxRuntimeModel, export_onnx, max_abs_diff
from dacnn.fileio import check_writable
from dacnn.loading import load_source, resolve_weights
from dacnn.prune import SCOPES, prune_run
from dacnn.validation import option_type

FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx"}


def register(subparsers: argparse._SubParsersAction) -> None:

    p = subparsers.add_parser(
        "export",
        help="write a compact safetensors (fp32/fp16/int8) or ONNX file, each shared tensor once",
        description="Export a run's (or a weights file's) model: safetensors with every tensor stored "
        "once (fp32, fp16, or int8 per-output-channel weights) or an ONNX graph with one initializer "
        "per shared kernel.",
    )
    p.add_argument(
        "source", metavar="RUN_OR_CHECKPOINT", help="run directory, weights .safetensors or export"
    )
    p.add_argument("--format", choices=list(FORMATS), default="safetensors")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="ONNX: fp32 only")
    p.add_argument("-o", "--output", help="output file (default: beside the source, or <run>/export/)")
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="test-set accuracy of the source and of the export (needs the recorded dataset)",
    )
    p.add_argument("--limit", type=option_type("limit"),
                   help="evaluate on this many test images (seeded subset)")
    p.add_argument("--data-dir", help="dataset root (default: $DACNN_DATA, then the data default)")
    p.set_defaults(func=run_export)

    i = subparsers.add_parser("inspect", help="list a checkpoint's tensors, which are shared and their bytes")
    i.add_argument("file", metavar="FILE",
                   help=".safetensors (checkpoint or export), .onnx, or a run directory / .state.pt")
    i.set_defaults(func=run_inspect)

    r = subparsers.add_parser(
        "prune",
        help="magnitude-prune a run's model, fine-tune it, report the accuracy drop (DACNN Table 8)",
    )
    r.add_argument(
        "source",
        metavar="RUN",
        help="run directory (or a weights .safetensors with its sidecar: default fine-tuning settings)",
    )
    r.add_argument("--ratio", type=option_type("ratio"), required=True,
                   help="fraction of conv/linear weights set to zero")
    r.add_argument("--epochs", type=option_type("epochs", "prune"), default=0,
                   help="fine-tuning epochs with the masks kept (default 0)")
    r.add_argument(
        "--scope", choices=SCOPES, default="global", help="one threshold for all layers or per layer"
    )
    r.add_argument("--lr", type=option_type("lr"),
                   help="fine-tuning learning rate (default: a tenth of the run's)")
    r.add_argument("--train-subset", type=option_type("train_subset"),
                   help="fine-tune on this many training images")
    r.add_argument("--limit", type=option_type("limit"),
                   help="evaluate on this many test images (seeded subset)")
    r.add_argument("--data-dir", help="dataset root (default: $DACNN_DATA, then the data default)")
    r.add_argument("-o", "--output", help="output run directory (default: <run>-pruned<ratio>)")
    r.set_defaults(func=run_prune)


def _default_output(source: str, fmt: str, dtype: str) -> Path:
    path = Path(source)
    if path.is_dir():
        return path / "export" / f"model-{dtype}{FORMATS[fmt]}"
    stem = path.name.removesuffix(".safetensors")
    return path.with_name(f"{stem}-{dtype}{FORMATS[fmt]}")


def _input_size(model: torch.nn.Module, meta: dict[str, Any]) -> tuple[int, int, int]:
    """``(C, H, W)`` the model was trained on: padded size, else the dataset's, else the registry's."""
    info = getattr(model, "info", None)
    chans, height = (info.input_size[0], info.input_size[1]) if info is not None else (3, 32)
    if meta.get("dataset") in DATASETS:  # the rule training used (DatasetInfo.pad_for)
        return DATASETS[meta["dataset"]].input_size(meta.get("pad_to"))
    side = int(meta["pad_to"]) if meta.get("pad_to") else height
    return (chans, side, side)


def _accuracy_line(label: str, before: float, after: float, n: int, dataset: str) -> str:
    return (
        f"test accuracy ({dataset}, {n:,} images): source {before:.2f}%, {label} {after:.2f}% "
        f"({after - before:+.2f} points)"
    )


def run_export(args: argparse.Namespace) -> int:

    if args.format == "onnx" and args.dtype != "fp32":
        raise ConfigError(f"--format onnx writes float32 graphs; got --dtype {args.dtype}")
    out = Path(args.output) if args.output else _default_output(args.source, args.format, args.dtype)
    check_writable(out, "--output" if args.output else "the export")
    model, meta = load_source(args.source)
    keep = {k: meta[k] for k in ("dataset", "normalize", "pad_to", "source") if k in meta}
    counts = count_params(model)
    if args.format == "safetensors":

        info = export_safetensors(
            model,
            out,
            args.dtype,
            model_name=meta["model"],
            model_kwargs=meta.get("model_kwargs", {}),
            meta=keep,
        )
        fp32_bytes = (info.unique_params + info.buffer_values) * 4
        print(
            f"wrote {out}: {info.file_bytes:,} bytes ({args.dtype}), {info.file_bytes / fp32_bytes:.3f} of "
            "the "
            f"fp32 values ({info.unique_params:,} unique params + {info.buffer_values:,} buffer values)"
        )
        if args.dtype != "int8":
            per = info.bytes_per_value
            print(f"size ratio file / ((params + buffers) x {per} bytes) = {info.size_ratio:.4f}")
        exported, _ = load_exported(out)
    else:

        size = _input_size(model, meta)
        report = export_onnx(model, out, input_size=size)
        print(
            f"wrote {out}: {report.file_bytes:,} bytes, {report.initializers} initializers "
            f"({report.initializer_values:,} values), {report.conv_nodes} Conv and "
            f"{report.batchnorm_nodes} BatchNormalization nodes (BN not folded; {report.exporter} exporter)"
        )
        diff = max_abs_diff(out, model, torch.randn(8, *size, generator=torch.Generator().manual_seed(0)))
        print(f"max |onnxruntime - PyTorch| on 8 random inputs: {diff:.2e}")
        exported = OnnxRuntimeModel(out)
    shared = ", ".join(f"{s.name} used {s.uses}x" for s in counts.shared) or "none"
    print(
        f"params: {counts.unique:,} unique, {counts.per_use:,} counting every use "
        f"(x{counts.compression:.2f}); shared tensors, each stored once: {shared}"
    )
    if args.evaluate:
        loader = test_loader(meta, data_dir=args.data_dir, limit=args.limit)
        n = len(loader.split) if hasattr(loader, "split") else (args.limit or 0)
        before, after = test_accuracy(model, loader), test_accuracy(exported, loader)
        print(_accuracy_line(f"{args.format} {args.dtype}", before, after, n, meta["dataset"]))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if path.is_dir() or path.name.endswith(".state.pt"):  # a run: the file eval/export would read
        path = resolve_weights(path)
    print(format_report(inspect_file(path)))
    return 0


def run_prune(args: argparse.Namespace) -> int:

    r = prune_run(
        args.source,
        ratio=args.ratio,
        epochs=args.epochs,
        scope=args.scope,
        lr=args.lr,
        train_subset=args.train_subset,
        limit=args.limit,
        data_dir=args.data_dir,
        output=args.output,
    )
    print(
        f"pruned {r['ratio']:.0%} of the conv/linear weights ({r['scope']}): {r['nonzero_params']:,} of "
        f"{r['unique_params']:,} unique parameters non-zero (x{r['compression']:.2f})"
    )
    tuned = f", after {r['epochs']} fine-tuning epoch(s) {r['acc_after']:.2f}%" if r["epochs"] else ""
    print(
        f"test accuracy ({r['dataset']}): before {r['acc_before']:.2f}%, pruned {r['acc_pruned']:.2f}%"
        f"{tuned} (drop {r['acc_drop']:.2f} points)"
    )
    print(f"wrote {r['output']} (prune.json, config.yaml, checkpoints/)")
    return 0
