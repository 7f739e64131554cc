"""Config resolution, recipes, schedules, EMA/param groups, and the CLI's one-line errors."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dacnn import create_model, list_models
from dacnn.cli import main
from dacnn.errors import ConfigError
from dacnn.train import RECIPES, TrainConfig, config_from_dict, resolve_config
from dacnn.train.builders import LRSchedule, build_optimizer
from dacnn.train.ema import ModelEMA
from dacnn.train.optim import param_groups


def _yaml(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_precedence_defaults_recipe_yaml_flags(tmp_path):
    path = _yaml(tmp_path, {"recipe": "dacnn-cifar100", "lr": "5e-2", "batch_size": 64, "model": "dacnn14"})
    cfg = resolve_config({"batch_size": 32, "width": 16}, path)
    assert cfg.optimizer == "adagrad" and cfg.lr_milestones == [45]  # from the recipe
    assert cfg.lr == 0.05  # YAML (the string "5e-2" that PyYAML leaves unparsed becomes a float)
    assert cfg.batch_size == 32 and cfg.width == 16  # flags win
    assert cfg.momentum == TrainConfig().momentum  # untouched default


def test_unknown_yaml_key_names_the_key_and_the_file(tmp_path):
    path = _yaml(tmp_path, {"model": "dacnn14", "learning_rate": 0.1})
    with pytest.raises(ConfigError, match=r"cfg\.yaml: unknown key 'learning_rate'"):
        resolve_config({}, path)


@pytest.mark.parametrize(("data", "message"), [
    ({"epochs": "ten"}, "field 'epochs' must be an integer"),
    ({"flip": "yes"}, "field 'flip' must be true or false"),
    ({"optimizer": "lion"}, "field 'optimizer' must be one of"),
    ({"ema": 1.5}, "field 'ema'"),
    ({"lr_milestones": 45}, "field 'lr_milestones' must be a list"),
    ({"batch_size": 0}, "field 'batch_size' must be an integer >= 1"),
    ({"rand_augment": "rand-q3"}, "field 'rand_augment': RandAugment policy 'rand-q3': unknown section"),
    ({"mixup": 0.0}, "field 'mixup' must be a finite number > 0"),
    ({"cutmix": -1}, "field 'cutmix'"),
    ({"random_erasing": 1.5}, r"field 'random_erasing' must be a finite number in \[0, 1\]"),
])
def test_bad_values_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_batch_augmentations_default_to_none_so_results_keep_their_config_hashes():
    defaults = TrainConfig()
    assert all(getattr(defaults, k) is None for k in ("rand_augment", "random_erasing", "mixup", "cutmix"))
    cfg = config_from_dict({"rand_augment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25, "mixup": 0.5,
                            "cutmix": 1.0})
    assert (cfg.rand_augment, cfg.random_erasing, cfg.mixup, cfg.cutmix) == ("rand-m9-mstd0.5-inc1", 0.25,
                                                                             0.5, 1.0)


def test_recipe_milestones_scale_with_epochs_unless_given():
    assert resolve_config({"recipe": "dacnn-cifar100", "epochs": 9}).lr_milestones == [4]
    assert resolve_config({"recipe": "lrunet", "epochs": 30}).lr_milestones == [20, 25]
    assert resolve_config({"recipe": "lrunet", "epochs": 30, "lr_milestones": [10]}).lr_milestones == [10]


def test_every_recipe_cites_its_source_and_validates():
    assert {"dacnn-cifar100", "dacnn-cifar10", "dacnn-svhn", "lrunet", "ks-seresnet", "ks-convmixer",
            "demo"} <= set(RECIPES)
    for recipe in RECIPES.values():
        assert recipe.doc and any(w in recipe.doc for w in ("section", "SPEC", "arXiv")), recipe.name
        config_from_dict({**recipe.settings, "recipe": recipe.name})
        if "model" in recipe.settings:
            assert recipe.settings["model"] in list_models(), recipe.name
    convmixer = RECIPES["ks-convmixer"]  # SPEC.md 1.2's augmentation, nothing out of reach
    assert {k: convmixer.settings[k] for k in ("rand_augment", "mixup", "cutmix", "random_erasing",
                                                "label_smoothing")} == {
        "rand_augment": "rand-m9-mstd0.5-inc1", "mixup": 0.5, "cutmix": 0.5, "random_erasing": 0.25,
        "label_smoothing": 0.1}
    assert "out of reach" not in convmixer.doc.lower()
    assert RECIPES["lrunet"].settings["normalize"] is False


def test_lr_schedules():
    multistep = LRSchedule(config_from_dict({"lr": 0.1, "lr_schedule": "multistep", "lr_milestones": [2, 4],
                                             "epochs": 6}), steps_per_epoch=10)
    assert [multistep(e, 0) for e in range(6)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    cosine = LRSchedule(config_from_dict({"lr": 0.01, "lr_schedule": "cosine", "min_lr": 1e-6, "epochs": 2,
                                          "warmup_epochs": 0.5}), steps_per_epoch=10)
    assert cosine(0, 0) == pytest.approx(0.002) and cosine(0, 4) == pytest.approx(0.01)
    assert cosine(1, 9) < cosine(1, 0) < cosine(0, 5)
    assert cosine(1, 9) == pytest.approx(1e-6 + (0.01 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 14 / 15)))


def test_ema_moves_a_shared_kernel_once_per_step():
    model = create_model("dacnn14", width=8, num_classes=10)
    ema = ModelEMA(model, decay=0.9)
    before = ema.module.kernels.anchor.weight.clone()
    with torch.no_grad():
        model.kernels.anchor.weight.add_(1.0)
    ema.update(model)
    # 12 uses of the anchor, yet it moves 1 - 0.9 = 0.1 of the way, not 1 - 0.9**12
    torch.testing.assert_close(ema.module.kernels.anchor.weight, before + 0.1)


def test_param_groups_hold_each_shared_tensor_once():
    model = create_model("dacnn14_mix", num_classes=10)
    groups = param_groups(model, 5e-4, decay_1d=False)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.ndim > 1 for p in groups[0]["params"]) and groups[1]["weight_decay"] == 0.0
    opt = build_optimizer(model, config_from_dict({"optimizer": "adamw", "weight_decay": 0.01, "lr": 0.01,
                                                   "decay_norm_and_bias": False}))
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 2


# ------------------------------------------------------------------ CLI errors: exit 2, one line


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--model", "no_such_net", "--dataset", "cifar10"], "unknown model 'no_such_net'"),
    (["train", "--model", "dacnn14", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["train", "--recipe", "dacnn-cifar1000"], "unknown recipe 'dacnn-cifar1000'"),
    (["train", "--model", "dacnn14", "--dataset", "cifar10", "--depth", "8"], "model 'dacnn14' rejects"),
    (["train", "--dataset", "cifar10"], "no model given"),
    (["train", "-c", "/nonexistent/cfg.yaml"], "cannot read config file /nonexistent/cfg.yaml"),
    (["eval", "--checkpoint", "/nonexistent/run"], "checkpoint '/nonexistent/run' does not exist"),
])
def test_cli_errors_are_one_line_with_exit_2(argv, message, capsys, tmp_path):
    assert main([*argv, *(["--out-dir", str(tmp_path)] if argv[0] == "train" else [])]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.integration
def test_cli_bad_yaml_key_in_a_real_process(tmp_path):
    path = _yaml(tmp_path, {"model": "dacnn14", "epochs": 1, "lr_sched": "cosine"})
    result = subprocess.run([sys.executable, "-m", "dacnn", "train", "-c", str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown key 'lr_sched'; did you mean lr_schedule?" in result.stderr
    assert "Traceback" not in result.stderr


def test_print_config_and_model_kwargs_flags(capsys):
    argv = ["train", "--recipe", "demo", "--epochs", "2", "--model-kwargs", "shared=false", "--amp",
            "--lr-milestones", "--print-config"]
    assert main(argv) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model_kwargs"] == {"shared": False} and cfg["amp"] == "bf16"
    assert cfg["lr_milestones"] == [] and cfg["epochs"] == 2 and cfg["model"] == "dacnn14"
    assert main(["train", "--list-recipes"]) == 0
    assert "ks-convmixer" in capsys.readouterr().out
