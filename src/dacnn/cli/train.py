"""``dacnn train`` and ``dacnn eval``.

Every :class:`~dacnn.train.config.TrainConfig` field is a flag (``lr_milestones`` ->
``--lr-milestones``); ``-c config.yaml`` gives defaults, a ``--recipe`` gives defaults below the
YAML file, flags override both. ``--resume RUN`` continues a run with its saved configuration.
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from dacnn.analysis.evaluate import evaluate_checkpoint
from dacnn.errors import ConfigError, RunFinished
from dacnn.registry import list_pretrained
from dacnn.train.config import (
    FIELD_NAMES,
    TrainConfig,
    config_from_dict,
    dump_yaml,
    field_types,
    resolve_config,
    unwrap_optional,
)
from dacnn.train.loop import train
from dacnn.train.recipes import list_recipes
from dacnn.train.rundir import check_same_architecture, find_run_dir, saved_config
from dacnn.validation import option_type

EPILOG = """examples:
  dacnn train --recipe demo                              # ~3 min on 2 CPU cores, Fashion-MNIST
  dacnn train --model dacnn18_mix_reg --recipe dacnn-cifar10 --epochs 9 --train-subset 5000
  dacnn train -c my.yaml --lr 0.05 --ckpt-every-steps 100
  dacnn train --resume runs/20250101-120000-dacnn14-fashion_mnist
  torchrun --nproc-per-node 2 -m dacnn train --recipe demo
"""


def _parse_kwarg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:

    types_ = field_types()
    group = parser.add_argument_group("configuration (override the recipe and the YAML file)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        base = unwrap_optional(types_[f.name])[0]
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help")}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(base) is list:
            item = typing.get_args(base)[0]
            item_type = option_type(f.name) if item in (int, float) else item
            group.add_argument(flag, nargs="*", type=item_type, metavar="N" if item is int else "X", **kw)
        elif typing.get_origin(base) is dict:
            group.add_argument(flag, nargs="+", type=_parse_kwarg, metavar="KEY=VALUE", **kw)
        elif f.name == "amp":
            group.add_argument(flag, nargs="?", const="bf16", **kw)
        else:
            metavar = {int: "N", float: "X"}.get(base, f.name.upper())
            kind = option_type(f.name) if base in (int, float) else base
            group.add_argument(flag, type=kind, metavar=None if "choices" in kw else metavar, **kw)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (recipes, checkpoints, resume, DDP)",
        description="Train a registered model on a dataset with a paper's recipe.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", metavar="YAML", help="YAML file of config keys (flags override it)")
    p.add_argument("--resume", metavar="RUN", help="continue a run (its directory or name under --out-dir)")
    p.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    _add_config_flags(p)
    p.set_defaults(func=run_train)

    e = subparsers.add_parser("eval", help="evaluate a checkpoint on a dataset split",
                              description="Accuracy of a run's selected model or of a .safetensors file "
                                          "(with its JSON sidecar) on a dataset split.")
    what = e.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", metavar="RUN_OR_FILE",
                      help="run directory, .safetensors file (training, imported or `dacnn export` output "
                           "of any dtype), .state.pt or released .t7 file")
    what.add_argument("--model", metavar="MODEL.TAG",
                      help="pretrained weights by name, with --pretrained (see `dacnn models --pretrained`)")
    e.add_argument("--pretrained", action="store_true", help="load --model's released weights")
    e.add_argument("--weights-dir", help="where pretrained files are looked for first (then $DACNN_WEIGHTS, "
                                         "a path list, then ~/.cache/dacnn/weights)")
    e.add_argument("--dataset", help="dataset (default: the one the checkpoint names)")
    e.add_argument("--data-dir", help="data root (default: $DACNN_DATA)")
    e.add_argument("--split", default="test", help="split to evaluate (default: test)")
    e.add_argument("--which", default="best", choices=("best", "last"), help="for a run: which checkpoint")
    e.add_argument("--batch-size", type=option_type("eval_batch_size"), default=500, metavar="N")
    e.add_argument("--device", default="auto")
    e.add_argument("--tta", type=option_type("tta"), default=None, metavar="N",
                   help="test-time augmentation level (default: the one the weights were measured with; "
                        "0 = none)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=run_eval)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:

    values = {name: getattr(args, name) for name in FIELD_NAMES if hasattr(args, name)}
    if "model_kwargs" in values:
        values["model_kwargs"] = dict(values["model_kwargs"])
    return values


def run_train(args: argparse.Namespace) -> int:

    if args.list_recipes:
        for recipe in list_recipes():
            print(f"{recipe.name:16s} {recipe.summary}")
        return 0
    overrides = _overrides(args)
    if args.resume:
        run_dir = find_run_dir(args.resume, overrides.get("out_dir", "runs"))
        saved = saved_config(run_dir)
        base = config_from_dict(saved, source=f"{run_dir}/config").to_dict()
        cfg = resolve_config(overrides, args.config, base=base)
        check_same_architecture(base, cfg.to_dict(), run_dir)  # before any work
        changed = {k: v for k, v in cfg.to_dict().items() if base.get(k) != v}
        if changed:
            print(f"resuming with changed settings: {changed}")
    else:
        cfg = resolve_config(overrides, args.config)
        run_dir = None
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    if cfg.model is None:
        raise ConfigError("no model given: use --model NAME (see `dacnn models`) or --recipe NAME")
    try:
        train(cfg, resume=run_dir)
    except RunFinished as done:
        print(done)
    return 0


def run_eval(args: argparse.Namespace) -> int:

    if args.model is not None and not args.pretrained:
        raise ConfigError(f"--model {args.model} evaluates released weights: add --pretrained")
    if args.model is not None and args.model not in list_pretrained():
        raise ConfigError(f"--model {args.model}: no such pretrained name; choose one of "
                          f"{', '.join(list_pretrained())}")
    result, meta = evaluate_checkpoint(args.checkpoint or args.model, dataset=args.dataset,
                                       data_dir=args.data_dir, split=args.split, batch_size=args.batch_size,
                                       device=args.device, which=args.which, weights_dir=args.weights_dir,
                                       tta=args.tta)
    params = meta["unique_params"]
    if args.json:
        print(json.dumps({"weights": meta["weights"], "model": meta["model"], "dataset": meta["dataset"],
                          "split": args.split, "accuracy": result.acc, "loss": result.loss, "n": result.n,
                          "tta": meta["tta"], "unique_params": params}))
    else:
        views = f", test-time augmentation level {meta['tta']}" if meta["tta"] else ""
        print(f"{Path(meta['weights']).name}: {meta['model']} on {meta['dataset']}/{args.split}: "
              f"accuracy {result.acc:.2f} % (loss {result.loss:.4f}, {result.n:,} images{views}) | "
              f"unique params {params:,}")
    return 0
