"""The allowed range of every numeric option and config field, in one table (:data:`RULES`).

Command-line flags parse through :func:`option_type` (argparse then names the flag and exits 2) and
:func:`dacnn.train.config.validate` checks YAML files and the API against the same rules, so
``--lr inf``, ``lr: .nan``, ``--width 0``, ``--momentum -5`` and ``--betas 2 3`` are refused alike.
Floats must also be finite. ``RULES`` is keyed by option name; ``"<command>.<name>"`` entries
override it for one command (``prune --epochs`` may be 0).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Rule", "RULES", "rule_for", "option_type", "check_value"]


@dataclass(frozen=True)
class Rule:
    """``kind`` (int or float) within ``[low, high]``; ``low_open``/``high_open`` exclude the bound."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def _text(self, value: float) -> str:
        return str(int(value)) if self.kind is int else f"{value:g}"

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{what} in {left}{self._text(self.low)}, {self._text(self.high)}{right}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {self._text(self.low)}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {self._text(self.high)}"
        return what

    def problem(self, value: Any) -> str | None:
        """None when ``value`` obeys the rule, else what it must be."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return self.describe()
        if self.kind is int and not (isinstance(value, int) or float(value).is_integer()):
            return self.describe()
        if not math.isfinite(value):
            return self.describe()
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return self.describe()
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return self.describe()
        return None

    def example(self) -> str:
        """A text this rule accepts."""
        if self.low is None:
            return "1"
        if self.high is not None:
            value = (self.low + self.high) / 2
            return self._text(round(value) if self.kind is int else value)
        return self._text(self.low + 1) if self.low_open or self.kind is int else self._text(self.low)

    def bad_values(self) -> list[str]:
        """Texts this rule refuses (for tests): out of range, not finite, wrong kind."""
        bad = ["nan", "inf"] if self.kind is float else ["1.5", "x"]
        if self.low is not None:
            bad.append(self._text(self.low) if self.low_open else self._text(self.low - 1))
        if self.high is not None:
            bad.append(self._text(self.high) if self.high_open else self._text(self.high + 1))
        return bad


def _int(low: float | None = None, high: float | None = None) -> Rule:
    return Rule(int, low, high)


def _pos() -> Rule:
    return Rule(float, 0.0, low_open=True)


def _frac(low_open: bool = False) -> Rule:
    return Rule(float, 0.0, 1.0, low_open=low_open, high_open=True)


RULES: dict[str, Rule] = {
    # training configuration (TrainConfig fields; train flags, YAML keys and recipes)
    "width": _int(1), "depth": _int(1), "train_subset": _int(1), "val_size": _int(0),
    "crop_padding": _int(0), "rotate_degrees": Rule(float, 0.0, 180.0), "cutout": _int(0),
    "pad_to": _int(1), "epochs": _int(1), "batch_size": _int(1), "eval_batch_size": _int(1),
    "lr": _pos(), "momentum": _frac(), "weight_decay": Rule(float, 0.0), "betas": _frac(),
    "eps": _pos(), "lr_milestones": _int(1), "lr_gamma": _pos(), "min_lr": Rule(float, 0.0),
    "warmup_epochs": Rule(float, 0.0), "label_smoothing": _frac(), "clip_grad": _pos(),
    "ema": _frac(low_open=True), "seed": _int(0, 2**32 - 1), "nan_check_every": _int(0),
    "threads": _int(1), "ckpt_every_steps": _int(0), "keep_checkpoints": _int(1),
    "translate": _int(0), "lr_triangle": Rule(float, 0.0), "norm_bias_lr_scale": _pos(),
    "whiten_bias_epochs": _int(0), "tta": _int(0, 2), "bn_momentum": Rule(float, 0.0, 1.0, low_open=True),
    "random_erasing": Rule(float, 0.0, 1.0), "mixup": _pos(), "cutmix": _pos(),
    # other commands
    "workers": _int(1), "jobs": _int(1), "timeout": _pos(), "shard_size": _int(1), "limit": _int(1),
    "ratio": _frac(), "prune.epochs": _int(0),
}


def rule_for(name: str, command: str | None = None) -> Rule:
    """The rule of option ``name`` (``"<command>.<name>"`` first)."""
    if command is not None and f"{command}.{name}" in RULES:
        return RULES[f"{command}.{name}"]
    return RULES[name]


def check_value(name: str, value: Any, command: str | None = None) -> str | None:
    """None when ``value`` (a number, or a list of numbers) is allowed for ``name``, else the problem."""
    rule = rule_for(name, command)
    for item in value if isinstance(value, list | tuple) else [value]:
        problem = rule.problem(item)
        if problem is not None:
            return f"must be {problem}, got {item!r}"
    return None


class _OptionType:
    """argparse ``type=``: parse the text as the rule's kind and check the range."""

    def __init__(self, name: str, command: str | None) -> None:
        self.name, self.command = name, command
        self.rule = rule_for(name, command)
        self.__name__ = self.rule.kind.__name__  # argparse's "invalid <name> value" fallback

    def __call__(self, text: str) -> int | float:
        try:
            value = self.rule.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.rule.describe()}, got {text!r}") from None
        problem = self.rule.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"must be {problem}, got {text!r}")
        return value


def option_type(name: str, command: str | None = None) -> _OptionType:
    """The argparse ``type=`` of numeric option ``name`` (a :data:`RULES` key)."""
    return _OptionType(name, command)
