"""Every file in conf/ and recipes/ composes and builds; configs cannot instantiate arbitrary code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vfmtune.choices import ConfigError
from vfmtune.compose import config_dirs, load_config, safe_instantiate, to_container, typed
from vfmtune.tasks.classifier import Classifier
from vfmtune.tasks.distiller import Distiller
from vfmtune.tasks.sam_prompter import SamPrompter

CONF, BASE = config_dirs()
GROUP_FILES = sorted((p.parent.name, p.stem) for p in CONF.glob("*/*.yaml"))
RECIPES = sorted(p.stem for p in (BASE / "recipes").glob("*.yaml"))


def test_config_files_found() -> None:
    groups = {g for g, _ in GROUP_FILES}
    assert {"backbone", "data", "finetune", "optim", "sched", "trainer"} <= groups
    assert RECIPES


@pytest.mark.parametrize(("group", "option"), GROUP_FILES)
def test_group_option__composes_and_builds(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}"]
    if group == "data" and option != "textile":
        overrides.append(f"data.{'root' if option == 'folder' else 'manifest'}={tmp_path}")
    cfg = load_config(*overrides)
    config = to_container(cfg)
    assert OmegaConf.missing_keys(cfg) == set()
    if group == "backbone":
        # Every backbone alias builds (random weights: the weight sources have their own tests).
        config["backbone"]["weights"] = "none"
    else:
        config["backbone"].update(name="timm/test_vit", weights="none", img_size=64)
    if group == "model" or config["task"] == "sam_prompt":  # SAM models: the tiny one stands in for the named one
        config["sam"].update(model="test_sam_tinyvit", weights=None)
        assert SamPrompter(config, ["background", "a"]).sam.image_encoder.img_size == 128
        return
    model = Classifier(config, ["a", "b"])
    assert model.head[-1].out_features == 2


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe__composes_builds_and_starts_with_its_command(recipe: str) -> None:
    text = (BASE / "recipes" / f"{recipe}.yaml").read_text().splitlines()
    assert text[0] == "# @package _global_"
    assert text[1].startswith("# vfmtune ") and f"recipes={recipe}" in text[1]
    command = text[1].split()[2]  # the recipe composes with its own command's schema
    config = to_container(load_config(f"recipes={recipe}", command=command))
    config["backbone"].update(name="timm/test_vit", weights="none", img_size=64)
    if config["task"] == "sam_prompt":
        config["sam"].update(model="test_sam_tinyvit", weights=None)
        SamPrompter(config, ["background", "a"])
    elif command == "distill":
        config["distill"]["weights"] = "none"
        model = Distiller(config, ["a", "b", "c"], teacher_info={"dim": 64, "img_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3})
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    else:
        Classifier(config, ["a", "b", "c"])


def test_command_schemas__reject_other_commands_keys() -> None:
    with pytest.raises(Exception, match="teacher"):
        load_config("teacher=runs/x")  # a distill key is not a train key
    assert load_config("teacher=runs/x", command="distill").teacher == "runs/x"


def test_enum_fields__invalid_value_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="frozen.*lora"):
        typed({"finetune": {"mode": "loraa"}})


@pytest.mark.parametrize(
    "node",
    [
        {"_target_": "os.system", "command": "echo pwned"},
        {"_target_": "torch.nn.Identity", "inner": {"_target_": "subprocess.call", "args": ["ls"]}},
        [{"_target_": "builtins.eval", "_args_": ["1"]}],
    ],
)
def test_safe_instantiate__rejects_targets_outside_allow_list(node: object) -> None:
    with pytest.raises(ConfigError, match="is not allowed"):
        safe_instantiate(node, "callbacks")


def test_safe_instantiate__builds_allowed_targets() -> None:
    cb = safe_instantiate({"_target_": "lightning.pytorch.callbacks.LearningRateMonitor"}, "callbacks[0]")
    assert type(cb).__name__ == "LearningRateMonitor"


def test_trainer_section_is_lightning_signature() -> None:
    cfg = load_config("trainer.gradient_clip_val=1.0", "trainer.precision=bf16-mixed")
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.precision == "bf16-mixed"
