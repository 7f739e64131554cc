"""The training configuration: one typed dataclass, resolved from defaults < recipe < YAML < flags.

Every field has a command-line flag of the same name (``lr_milestones`` -> ``--lr-milestones``), so a
YAML file, a recipe and the CLI all speak the same keys. :func:`resolve_config` applies the layers
and validates the result; an unknown key or a value of the wrong type raises :class:`ConfigError`
naming the key and where it came from.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dacnn.data.batch_augment import RandAugmentSpec
from dacnn.errors import ConfigError
from dacnn.train.recipes import get_recipe
from dacnn.validation import RULES, check_value

__all__ = ["TrainConfig", "resolve_config", "load_yaml", "config_from_dict", "dump_yaml"]

OPTIMIZERS = ("sgd", "adagrad", "adamw", "adam")
SCHEDULES = ("constant", "multistep", "cosine", "triangle")
AMP_MODES = ("auto", "none", "bf16", "fp16")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a training run depends on; written to ``<run>/config.yaml`` once resolved."""

    # what to train
    model: str | None = _f(None, "registered model name (see `dacnn models`)")
    dataset: str | None = _f(None, "dataset name: cifar10, cifar100, svhn, fashion_mnist")
    recipe: str | None = _f(None, "named preset giving defaults (see --list-recipes)")
    width: int | None = _f(None, "model width (channels), passed to create_model")
    depth: int | None = _f(None, "model depth, passed to create_model (generic builders only)")
    model_kwargs: dict[str, Any] = _f({}, "other create_model keyword arguments (KEY=VALUE)")
    # data
    data_dir: str | None = _f(None, "data root (default: $DACNN_DATA, then the data package's default)")
    train_subset: int | None = _f(None, "train on the first N images of a seeded permutation")
    val_size: int = _f(5000, "images held out from train for model selection (0: select the last epoch)")
    crop_padding: int = _f(0, "random-crop augmentation: pad by this many pixels, crop back")
    flip: bool = _f(False, "random horizontal flip")
    rotate_degrees: float = _f(0.0, "random rotation range in degrees (LruNet: 10)")
    cutout: int = _f(0, "cutout square size (0: off)")
    translate: int = _f(0, "random translation by up to N pixels with reflect padding (airbench; "
                           "crop_padding is the zero-padded crop)")
    alternate_flip: bool = _f(False, "with flip: every image is flipped in every other epoch, starting "
                                     "from a seeded random half (airbench's derandomised flip)")
    rand_augment: str | None = _f(None, "timm RandAugment policy per training image after crop and flip, "
                                        "e.g. rand-m9-mstd0.5-inc1 (ConvMixer, SPEC 1.2); needs the `aug` "
                                        "extra (kornia)")
    random_erasing: float | None = _f(None, "probability of timm's RandomErasing per training image: one "
                                            "box of N(0, 1) noise after normalisation (ConvMixer: 0.25)")
    mixup: float | None = _f(None, "mixup alpha: each batch blended with its mirror, lambda ~ Beta(a, a), "
                                   "trained on soft targets (timm's Mixup, batch mode; ConvMixer 0.5)")
    cutmix: float | None = _f(None, "CutMix alpha: a box of the mirrored batch pasted in, area ~ Beta(alpha, "
                                    "alpha); with mixup each batch takes one of the two, each half the time")
    normalize: bool = _f(True, "per-channel mean/std normalisation")
    pad_to: int | None = _f(None, "zero-pad images to this size (default: the model's input size)")
    # optimisation
    epochs: int = _f(90, "number of epochs")
    batch_size: int = _f(128, "global batch size (split across DDP ranks)")
    eval_batch_size: int = _f(500, "batch size for validation and test")
    optimizer: str = _f("sgd", f"one of {', '.join(OPTIMIZERS)}", choices=OPTIMIZERS)
    lr: float = _f(0.1, "base learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(False, "Nesterov momentum (SGD)")
    weight_decay: float = _f(0.0, "weight decay")
    decay_norm_and_bias: bool = _f(True, "also decay 1-d tensors (biases, norm affine)")
    decoupled_weight_decay: bool = _f(False, "weight_decay is the fraction of every weight removed per "
                                             "step at schedule factor 1, whatever the lr of its group "
                                             "(airbench; PyTorch's decay is lr x weight_decay)")
    norm_bias_lr_scale: float = _f(1.0, "lr multiplier of normalisation-layer biases (airbench: 64)")
    freeze_norm_scale: bool = _f(False, "keep every normalisation layer's scale at 1 (not trained)")
    shared_norm_scale: bool = _f(False, "the normalisation layers right after a use of a shared kernel "
                                        "learn their scale, even under freeze_norm_scale or in a model "
                                        "that fixes it (DACNN's free per-layer BatchNorm)")
    bn_momentum: float | None = _f(None, "running-statistics momentum of every BatchNorm (PyTorch's sense; "
                                         "default: the model's; airbench: 0.4)")
    betas: list[float] = _f([0.9, 0.999], "Adam/AdamW betas")
    eps: float | None = _f(None, "optimizer epsilon (default: the optimizer's)")
    lr_schedule: str = _f("constant", f"one of {', '.join(SCHEDULES)}", choices=SCHEDULES)
    lr_triangle: list[float] = _f([0.2, 0.23, 0.07], "triangle schedule (per iteration): lr factor at "
                                  "the start, where it peaks at 1 (fraction of training), factor at the end")
    lr_milestones: list[int] = _f([], "epochs at which multistep multiplies lr by lr_gamma")
    lr_gamma: float = _f(0.1, "multistep factor")
    min_lr: float = _f(0.0, "cosine floor")
    warmup_epochs: float = _f(0.0, "linear warm-up length in epochs (per iteration)")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy")
    clip_grad: float | None = _f(None, "clip the global gradient norm to this value")
    ema: float | None = _f(None, "EMA decay of the weights (e.g. 0.999); evaluation uses the EMA")
    lookahead: bool = _f(False, "airbench's lookahead averaging: from 30 %% of the epochs on, every 5 steps "
                                "the weights move to an average of decay 0.95^5 (t/T)^3 and continue from it")
    whiten: bool = _f(False, "initialise the model's first conv as a frozen patch-whitening filter bank "
                             "from 5,000 training images (airbench; models with a free first conv)")
    whiten_bias_epochs: int = _f(3, "with whiten: epochs during which the whitening conv's bias trains")
    tta: int = _f(0, "test-time augmentation of the test evaluation (validation: none): 0 none, 1 mirror, "
                     "2 mirror and 1-pixel translations (airbench's level 2: six views)")
    # runtime
    seed: int = _f(0, "seed of weights, data order and augmentation")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms; bitwise-reproducible on CPU")
    compile: bool | None = _f(None, "torch.compile the model (default: on with CUDA; off on CPU, where it "
                                      "pays back only on long runs: <= 10 %% after a 20-76 s warm-up)")
    channels_last: bool | None = _f(None, "channels_last memory format (default: on with CUDA; on CPU per "
                                          "model family as measured, dacnn.train.speed)")
    amp: str = _f("auto", "autocast dtype: auto (bf16 on CUDA, none on CPU), none, bf16, fp16 (GPU only, "
                          "with a GradScaler); a bare --amp means bf16", choices=AMP_MODES)
    nan_check_every: int | None = _f(None, "check the loss for nan/inf every N steps, before the step "
                                           "(default: 1 on CPU; on CUDA 0: flags gathered on the device, "
                                           "read at checkpoints and epoch ends, no host sync per step)")
    threads: int | None = _f(None, "CPU threads of torch (default: the cores not busy with other processes, "
                                   "dacnn.runtime.idle_cores; with --deterministic torch's one per core)")
    # output
    out_dir: str = _f("runs", "directory holding run directories")
    run_name: str | None = _f(None, "run directory name (default: <date>-<model>-<dataset>)")
    ckpt_every_steps: int = _f(0, "also checkpoint every N steps (0: only at the end of each epoch)")
    keep_checkpoints: int = _f(2, "checkpoint versions kept on disk: the newest N (>= 1) and the best")
    tensorboard: bool = _f(False, "write TensorBoard logs (needs the `tb` extra)")
    eval_test: bool = _f(True, "evaluate the selected model on the test split at the end")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (what config.yaml and checkpoints hold)."""
        return asdict(self)


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))
#: Fields with a range rule in :data:`dacnn.validation.RULES` (every int and float field).
NUMERIC_FIELDS = tuple(name for name in FIELD_NAMES if name in RULES)


def field_types() -> dict[str, Any]:
    """``name -> annotation`` with string annotations evaluated."""
    return typing.get_type_hints(TrainConfig)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


def _coerce(name: str, value: Any, tp: Any, source: str) -> Any:
    """Check/convert one value against its annotation; YAML's ``1e-3`` (a string) becomes a float."""
    base, optional = unwrap_optional(tp)
    where = f"{source}: field {name!r}"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} must not be empty")
    origin = typing.get_origin(base)
    if origin is list:
        (item_tp,) = typing.get_args(base)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(f"{name}[{i}]", v, item_tp, source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if base is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def check_keys(data: Mapping[str, Any], source: str) -> None:
    """Raise :class:`ConfigError` naming the first unknown key (with close matches)."""
    for key in data:
        if key not in FIELD_NAMES:
            close = difflib.get_close_matches(str(key), FIELD_NAMES, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")


def config_from_dict(data: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """Validated :class:`TrainConfig` from a plain dict (missing keys take the defaults)."""
    check_keys(data, source)
    types_ = field_types()
    values = {k: _coerce(k, v, types_[k], source) for k, v in data.items()}
    cfg = TrainConfig(**values)
    validate(cfg, source)
    return cfg


def validate(cfg: TrainConfig, source: str = "config") -> None:
    """Range and choice checks that the types alone do not express."""
    for f in fields(TrainConfig):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise ConfigError(
                f"{source}: field {f.name!r} must be one of {', '.join(choices)}, got {value!r}"
            )
    for name in NUMERIC_FIELDS:  # ranges: one table for flags, YAML and the API
        value = getattr(cfg, name)
        problem = check_value(name, value) if value is not None else None
        if problem is not None:
            raise ConfigError(f"{source}: field {name!r} {problem}")
    if len(cfg.betas) != 2:
        raise ConfigError(f"{source}: field 'betas' needs two numbers, got {cfg.betas}")
    start, peak, end = (cfg.lr_triangle + [None] * 3)[:3] if len(cfg.lr_triangle) == 3 else (None,) * 3
    if start is None or not 0.0 < peak < 1.0:
        raise ConfigError(f"{source}: field 'lr_triangle' needs three numbers (start factor, peak position "
                          f"in (0, 1), end factor), got {cfg.lr_triangle}")
    if cfg.translate and cfg.crop_padding:
        raise ConfigError(f"{source}: fields 'translate' and 'crop_padding' are two kinds of random crop; "
                          "set one of them")
    if cfg.alternate_flip and not cfg.flip:
        raise ConfigError(f"{source}: field 'alternate_flip' changes how 'flip' flips; set flip too")
    if cfg.rand_augment is not None:
        try:
            RandAugmentSpec.parse(cfg.rand_augment)
        except ConfigError as exc:
            raise ConfigError(f"{source}: field 'rand_augment': {exc}") from None
    if cfg.lookahead and cfg.ema is not None:
        raise ConfigError(f"{source}: fields 'lookahead' and 'ema' both average the weights; set one")
    if cfg.lookahead and cfg.ckpt_every_steps:
        raise ConfigError(f"{source}: field 'lookahead' checkpoints at epoch ends only (the average is "
                          "the model there); set ckpt_every_steps to 0")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, bad YAML or a non-mapping raises :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text (UTF-8) file (byte {exc.start} is not UTF-8)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    check_keys(data, str(path))
    return data


def dump_yaml(cfg: TrainConfig) -> str:
    """The resolved configuration as YAML (field order kept)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def resolve_config(
    overrides: Mapping[str, Any] | None = None,
    yaml_path: str | Path | None = None,
    base: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Defaults < recipe < YAML file < ``overrides`` (flags), validated.

    ``base`` replaces the defaults (used by ``--resume``: the run's saved config). When a recipe sets
    ``lr_milestones`` for its own ``epochs`` and the epochs are changed without giving milestones,
    the milestones are scaled in proportion (a 9-epoch ``dacnn-cifar100`` drops lr after epoch 4.5
    -> 4, as 90 epochs do at 45), so every recipe scales down.
    """

    overrides = dict(overrides or {})
    check_keys(overrides, "command line")
    file_values = load_yaml(yaml_path) if yaml_path is not None else {}
    merged: dict[str, Any] = dict(base or {})
    recipe_name = overrides.get("recipe", file_values.get("recipe", merged.get("recipe")))
    recipe_values: dict[str, Any] = {}
    if recipe_name is not None and base is None:
        recipe_values = get_recipe(recipe_name).settings
        merged.update(recipe_values)
        merged["recipe"] = recipe_name
    merged.update(file_values)
    merged.update(overrides)
    user_set = set(file_values) | set(overrides)
    if (
        recipe_values.get("lr_milestones")
        and "lr_milestones" not in user_set
        and "epochs" in user_set
        and merged["epochs"] != recipe_values["epochs"]
    ):
        scale = merged["epochs"] / recipe_values["epochs"]
        merged["lr_milestones"] = sorted({max(1, int(m * scale)) for m in recipe_values["lr_milestones"]})
    return config_from_dict(merged, source=str(yaml_path) if yaml_path else "command line")
