"""Bad input gets a sentence, a non-zero exit and no traceback.

Every numeric option of every command is checked at parse time by a rule of
:data:`dacnn.validation.RULES`; this walks the real parser so a new option without a rule fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path

import pytest

from _helpers import read_only_command
from dacnn import checkpoint as ckpt
from dacnn import create_model
from dacnn.cli import build_parser, main
from dacnn.data.synthetic import write_cifar
from dacnn.errors import ConfigError
from dacnn.train.config import NUMERIC_FIELDS, TrainConfig, config_from_dict, field_types, unwrap_optional
from dacnn.validation import rule_for

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


def _numeric_options():
    """``(command words, required args, flag, rule)`` for every numeric option of every command."""
    found, unruled = [], []
    for prefix, parser in _commands(build_parser()):
        required: list[str] = []
        numeric = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            rule = getattr(action.type, "rule", None)
            if action.type in (int, float):
                unruled.append(f"{' '.join(prefix)} {action.option_strings or action.dest}")
            if rule is not None:
                numeric.append((action, rule))
            if not action.option_strings and action.nargs not in ("?", "*"):
                required.append(str(action.choices[0]) if action.choices else "x")
            elif action.option_strings and action.required:
                required += [action.option_strings[0], rule.example() if rule else "x"]
        for group in parser._mutually_exclusive_groups:  # e.g. eval's --checkpoint | --model
            if group.required:
                required += [group._group_actions[0].option_strings[0], "x"]
        for action, rule in numeric:
            found.append((prefix, required, action.option_strings[0], rule))
    return found, unruled


def test_every_numeric_option_of_every_command_has_a_rule():
    found, unruled = _numeric_options()
    assert not unruled, f"numeric options parsed without a rule of dacnn.validation.RULES: {unruled}"
    commands = {p for p, *_ in found}
    assert {("train",), ("eval",), ("prune",), ("export",), ("data", "verify"), ("reproduce",)} <= commands


def test_a_bad_value_of_each_numeric_option_is_refused_at_parse_time(capsys):
    found, _ = _numeric_options()
    tried = 0
    for prefix, required, flag, rule in found:
        parser = build_parser()
        parser.parse_args([*prefix, *required, flag, rule.example()])  # the valid example parses
        for bad in rule.bad_values():
            with pytest.raises(SystemExit) as exit_info:
                build_parser().parse_args([*prefix, *required, flag, bad])
            assert exit_info.value.code == 2, (prefix, flag, bad)
            err = capsys.readouterr().err
            assert f"argument {flag}" in err and "must be" in err and "Traceback" not in err, err
            tried += 1
    print(f"{tried} bad values of {len(found)} numeric options refused")
    assert tried >= 4 * len(found) - len(found)  # at least 3 per option


def test_zero_negative_infinite_and_out_of_range_values_are_refused(capsys):
    for args in (["--width", "0"], ["--width", "-3"], ["--momentum", "-5"], ["--lr", "inf"],
                 ["--optimizer", "adam", "--betas", "2", "3"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--model", "dacnn", *args, "--print-config"])
        assert exit_info.value.code == 2
        assert f"argument {args[-2] if args[0] != '--optimizer' else '--betas'}" in capsys.readouterr().err


def test_every_numeric_config_field_has_a_rule_and_yaml_values_are_checked():
    types_ = field_types()
    numeric = []
    for f in fields(TrainConfig):
        base = unwrap_optional(types_[f.name])[0]
        item = typing.get_args(base)[0] if typing.get_origin(base) is list else base
        if item in (int, float):
            numeric.append(f.name)
    assert sorted(numeric) == sorted(NUMERIC_FIELDS)
    for name in numeric:
        rule = rule_for(name)
        for bad in rule.bad_values():
            value: object = float(bad) if bad in ("nan", "inf") else bad
            if bad not in ("nan", "inf", "x"):
                value = float(bad) if rule.kind is float or "." in bad else int(bad)
            if name in ("betas", "lr_milestones"):
                value = [value, value]
            with pytest.raises(ConfigError, match=f"field '{name}"):
                config_from_dict({name: value}, source="my.yaml")


def test_yaml_nan_lr_is_refused(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: dacnn\nlr: .nan\n")
    assert main(["train", "-c", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'lr'" in err and "finite" in err


def test_eval_of_a_one_channel_model_on_a_three_channel_dataset(tmp_path, capsys):
    write_cifar(tmp_path / "data" / "cifar10", n_train=10, n_test=10)
    model = create_model("dacnn", depth=4, width=8, num_classes=10, in_chans=1)
    meta = {"model": "dacnn", "model_kwargs": {"depth": 4, "width": 8, "num_classes": 10, "in_chans": 1},
            "dataset": "fashion_mnist"}
    weights = ckpt.save_weights(model, tmp_path / "grey.safetensors", meta)
    code = main(["eval", "--checkpoint", str(weights), "--dataset", "cifar10",
                 "--data-dir", str(tmp_path / "data")])
    assert code == 2
    err = capsys.readouterr().err
    assert "1-channel" in err and "3-channel" in err and str(weights) in err



def _dacnn(args: list[str], readonly: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dacnn", *args]
    if readonly is not None:
        cmd = read_only_command(readonly, cmd)
    return subprocess.run(cmd, env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.integration
def test_export_to_a_read_only_place_is_a_sentence(tmp_path):
    model = create_model("dacnn", depth=4, width=8, num_classes=10)
    meta = {"model": "dacnn", "model_kwargs": {"depth": 4, "width": 8, "num_classes": 10}}
    weights = ckpt.save_weights(model, tmp_path / "m.safetensors", meta)
    out = tmp_path / "ro" / "m.safetensors"
    result = _dacnn(["export", str(weights), "-o", str(out)], readonly=tmp_path / "ro")
    assert result.returncode == 2, result.stderr
    assert f"cannot write --output {out}" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
def test_import_weights_to_a_read_only_place_is_a_sentence(tmp_path):
    released = tmp_path / "x.t7"
    released.write_bytes(b"not read before the output is checked")
    out = tmp_path / "ro" / "x.safetensors"
    result = _dacnn(["import-weights", "lrunet", str(released), "-o", str(out)], readonly=tmp_path / "ro")
    assert result.returncode == 2, result.stderr
    assert f"cannot write --output {out}" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
@pytest.mark.parametrize("args", [["models", "--pattern", "dacnn"], ["data", "list"],
                                  ["train", "--list-recipes"]])
def test_a_command_piped_into_a_closed_reader_exits_quietly(args, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "dacnn", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": SRC,
                                                         "DACNN_DATA": str(tmp_path)})
    proc.stdout.close()  # `| head` that has already exited
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
