"""``dacnn import-weights``: convert released weights into a dacnn checkpoint.

``dacnn import-weights lrunet FILE [-o OUT.safetensors] [--no-verify]`` reads a released LruNet
checkpoint (``*.t7``, see the ``MANIFEST.json`` of the authors' release), checks its sha256
against the manifest beside it, converts it to :class:`~dacnn.models.lrunet.LruNet` and writes
``OUT.safetensors`` (``safetensors.torch.save_model``) plus the ``OUT.json`` sidecar that
``dacnn eval --checkpoint OUT.safetensors`` reads (model, arguments, dataset, no normalisation, no padding).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dacnn.counting import count_params
from dacnn.fileio import check_writable
from dacnn.importing import import_lrunet, save_imported

__all__ = ["register", "run"]

FAMILIES = ("lrunet",)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``import-weights`` subcommand."""
    parser = subparsers.add_parser(
        "import-weights",
        help="convert released weights (LruNet .t7) into a dacnn .safetensors checkpoint",
        description="Convert a released checkpoint into a .safetensors file + JSON sidecar for `dacnn eval`.",
    )
    parser.add_argument("family", choices=FAMILIES, help="model family of the released file")
    parser.add_argument("file", type=Path, help="released checkpoint, e.g. cifar10-lru14-ckpt-08934.t7")
    parser.add_argument("-o", "--output", type=Path, default=None, metavar="OUT.safetensors",
                        help="output file (default: ./<FILE stem>.safetensors)")
    parser.add_argument("--no-verify", action="store_true", help="skip the MANIFEST.json sha256 check")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    out = args.output or Path(Path(args.file).stem + ".safetensors")
    check_writable(out, "--output" if args.output else "the output")
    model, meta = import_lrunet(args.file, verify=not args.no_verify)
    save_imported(model, meta, out)
    kwargs = ", ".join(f"{k}={v}" for k, v in meta["model_kwargs"].items())
    print(f"{args.file} -> {out} (+ {out.with_suffix('.json').name})")
    print(f"  model {meta['model']}({kwargs}), dataset {meta['dataset']}, "
          f"{count_params(model).unique:,} parameters, released accuracy {meta.get('acc', '?')} %")
    print(f"  evaluate with: dacnn eval --checkpoint {out}")
    return 0
