"""``dacnn share``: the kernel-sharing plan :func:`dacnn.share_kernels` makes for a registered model.

``dacnn share MODEL [--scope stage|container|global] [--stride-policy same|unstrided|any]
[--include P ...] [--exclude P ...] [--containers P ...] [--budget ratio=R | --budget max_params=N]
[--json]`` builds ``MODEL`` (no training, no data), ties its convs and prints the groups (kernel,
shape, uses, parameters saved), the parameters before/after and every conv left free with the
reason. ``--budget ratio=0.5`` ties the groups that save the most first until the model has at most
half its parameters; ``--budget max_params=1000000`` an absolute count. A budget below the floor (the
count with every eligible group tied) is an error that names the floor.
"""

from __future__ import annotations

import argparse
import json

import torch

from dacnn.errors import ConfigError
from dacnn.registry import create_model
from dacnn.tying import SCOPES, STRIDE_POLICIES, ShareReport, share_kernels

__all__ = ["register", "plan", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``share`` subcommand."""
    parser = subparsers.add_parser(
        "share",
        help="print the kernel-sharing plan share_kernels makes for a registered model",
        description="Tie the isomorphic convs of a registered model (dacnn.share_kernels) and print "
                    "the groups, parameters saved and what stays free. Nothing is trained or saved.",
    )
    parser.add_argument("model", help="registered model name (see `dacnn models`)")
    parser.add_argument("--scope", choices=SCOPES, default="stage",
                        help="stage: same output resolution; container: same enclosing block "
                             "container; global: whole model (default: stage)")
    parser.add_argument("--stride-policy", choices=STRIDE_POLICIES, default="same",
                        help="which strides may share a kernel (default: same)")
    parser.add_argument("--include", nargs="+", metavar="P", help="fnmatch patterns of convs that may tie")
    parser.add_argument("--exclude", nargs="+", metavar="P", help="fnmatch patterns of convs to leave free")
    parser.add_argument("--containers", nargs="+", metavar="P",
                        help="with --scope container: fnmatch patterns of the modules that group convs")
    parser.add_argument("--budget", metavar="ratio=R|max_params=N",
                        help="tie the largest-saving groups first until at most R x the original "
                             "(0 < R <= 1) or N parameters remain")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def plan(args: argparse.Namespace) -> ShareReport:
    """The :class:`~dacnn.tying.ShareReport` of ``args.model`` shared as the flags say."""
    try:
        model = create_model(args.model)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0]) if exc.args else f"unknown model {args.model!r}") from None
    example = torch.zeros(2, *model.info.input_size)
    return share_kernels(model, args.scope, stride_policy=args.stride_policy, include=args.include,
                         exclude=args.exclude, containers=args.containers, budget=args.budget,
                         example_input=example)


def run(args: argparse.Namespace) -> int:
    report = plan(args)
    if args.json:
        print(json.dumps({"model": args.model, "scope": args.scope, "budget": args.budget,
                          **report.to_dict()}, indent=2))
    else:
        print(f"{args.model} (scope={args.scope}, stride_policy={args.stride_policy}"
              f"{', budget ' + args.budget if args.budget else ''}): {report}")
    return 0
