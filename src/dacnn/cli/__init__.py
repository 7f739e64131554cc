"""The ``dacnn`` command: one subcommand module per area, each exposing ``register(subparsers)``.

Subcommand modules live beside this file; each adds its parsers and sets ``func`` on them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dacnn import __version__
from dacnn.cli import data, export, models, reproduce, train, weights
from dacnn.errors import DacnnError

SUBCOMMAND_MODULES = (models, data, train, weights, export, reproduce)  # each has register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dacnn", description="Weight-shared CNNs: build, train, measure, compress, ship."
    )
    parser.add_argument("--version", action="version", version=f"dacnn {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DacnnError as exc:
        print(f"dacnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dacnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
