"""``dacnn publish``: a reproduction row's best weights join the pretrained table.

``dacnn publish table6 resnet18 --seed 0 --tag cifar10_cpu`` checks the recorded best checkpoint
(sha256, and the test accuracy measured again with today's code), copies it to
``weights/trained/resnet18.cifar10_cpu.safetensors`` and enters it in ``src/dacnn/trained_weights.json``
(run from a checkout of the project; elsewhere give ``--weights-root`` and ``--table``);
``dacnn eval --model resnet18.cifar10_cpu --pretrained --dataset cifar10`` then reproduces the figure
(with ``weights`` on ``$DACNN_WEIGHTS``). ``dacnn publish --retire resnet18.cifar10_cpu`` takes an
entry out of the table and deletes its file (weights a newer published model dominates).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dacnn.errors import ConfigError
from dacnn.experiments.publish import find_record, publish, retire
from dacnn.experiments.store import ResultsStore
from dacnn.hub import TRAINED_TABLE, eval_command
from dacnn.validation import option_type

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``publish`` subcommand."""
    p = subparsers.add_parser(
        "publish",
        help="add a reproduction row's best weights to the pretrained table",
        description="Verify a recorded best checkpoint (sha256 and test accuracy with today's code), copy it "
        "under weights/trained/ and enter it in the pretrained table as <model>.<tag>.",
    )
    p.add_argument("experiment", nargs="?", help="spec name, e.g. table6")
    p.add_argument("row", nargs="?", help="row id, e.g. resnet18")
    p.add_argument("--retire", metavar="MODEL.TAG",
                   help="instead: take this entry out of the table and delete its weights file")
    p.add_argument("--seed", type=option_type("seed"), default=0, help="seed of the row (default 0)")
    p.add_argument("--tag", help="pretrained tag, e.g. cifar10_cpu (required to publish)")
    p.add_argument(
        "--scale", default="cpu", choices=("cpu", "paper"), help="scale of the record (default cpu)"
    )
    p.add_argument("--results", default="results", help="results store directory (default: results)")
    p.add_argument("--data-dir", default=None, help="data root (default: $DACNN_DATA, then the default)")
    p.add_argument(
        "--weights-root",
        type=Path,
        default=None,
        help="where trained/ goes (default, run from a checkout of the project: its weights/)",
    )
    p.add_argument("--table", type=Path, default=None,
                   help="the trained-weights table to update (default, run from a checkout of the project: "
                        "the package's src/dacnn/trained_weights.json)")
    p.add_argument("--notes", default="", help="a note stored with the entry")
    p.set_defaults(func=run)


def _in_checkout() -> bool:
    """Run from the root of a checkout of the project, whose package is the one imported?"""
    return Path("src/dacnn/trained_weights.json").resolve() == TRAINED_TABLE.resolve()


def run(args: argparse.Namespace) -> int:
    if args.weights_root is None or args.table is None:
        if not _in_checkout():
            raise ConfigError("dacnn publish: outside a checkout of the project give --weights-root DIR "
                              "and --table FILE (where the weights and their table entry go)")
        args.weights_root = args.weights_root or Path("weights")
        args.table = args.table or TRAINED_TABLE
    if args.retire is not None:
        if args.experiment is not None:
            raise ConfigError("dacnn publish: --retire takes no EXPERIMENT ROW")
        entry = retire(args.retire, weights_root=args.weights_root, table=args.table)
        print(f"retired {args.retire} ({entry['accuracy']:.2f} % on {entry['dataset']}): removed from "
              f"{args.table} and {args.weights_root / entry['file']} deleted")
        return 0
    if args.experiment is None or args.row is None or args.tag is None:
        raise ConfigError("dacnn publish: give EXPERIMENT ROW --tag TAG (or --retire MODEL.TAG)")
    record = find_record(ResultsStore(args.results), args.experiment, args.row, args.seed, args.scale)
    entry = publish(
        record,
        args.tag,
        data_dir=args.data_dir,
        weights_root=args.weights_root,
        table=args.table,
        notes=args.notes,
    )
    print(
        f"published {entry['model']}.{entry['tag']}: {entry['accuracy']:.2f} % on {entry['dataset']} "
        f"({entry['bytes']:,} bytes, sha256 {entry['sha256'][:12]}...) -> {args.weights_root / entry['file']}"
    )
    print(f"  reproduce: {eval_command(entry)}")
    return 0
