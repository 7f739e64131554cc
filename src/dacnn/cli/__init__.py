"""The ``dacnn`` command: one subcommand module per area, each exposing ``register(subparsers)``.

Subcommand modules live beside this file; each adds its parsers and sets ``func`` on them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from dacnn.errors import DacnnError
from dacnn.runtime import tune_malloc

# Subcommands that train or evaluate: glibc keeps their freed activations (dacnn.runtime).
COMPUTE_COMMANDS = ("train", "eval", "reproduce")

# Modules (in dacnn.cli) that add subcommands; a module not written yet is skipped.
SUBCOMMAND_MODULES = ("models", "data", "train", "weights", "export", "reproduce")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dacnn", description="Weight-shared CNNs: build, train, measure, compress, ship."
    )
    parser.add_argument("--version", action="version", version=f"dacnn {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"dacnn.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"dacnn.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def _version() -> str:
    from dacnn import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command in COMPUTE_COMMANDS:
        tune_malloc()
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
