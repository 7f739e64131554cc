"""The ``dacnn`` command: one subcommand module per area, each exposing ``register(subparsers)``.

Subcommand modules live beside this file; each adds its parsers and sets ``func`` on them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dacnn import __version__
from dacnn.cli import data, export, models, publish, reproduce, results, share, train, weights
from dacnn.errors import DacnnError
from dacnn.runtime import tune_malloc

# Subcommands that train or evaluate: glibc keeps their freed activations (dacnn.runtime).
COMPUTE_COMMANDS = ("train", "eval", "reproduce", "publish")

# each has register(subparsers)
SUBCOMMAND_MODULES = (models, data, train, weights, export, reproduce, results, publish, share)


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
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
    except BrokenPipeError:  # `dacnn --help | head`
        _silence_stdout()
        return 141
    if args.command in COMPUTE_COMMANDS:
        tune_malloc()
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:  # `dacnn ... | head`: the reader has gone, stop quietly
        _silence_stdout()
        return 141
    except DacnnError as exc:
        print(f"dacnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an I/O failure no reader turned into a DacnnError: name the file
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"dacnn {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dacnn {args.command}: interrupted", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
