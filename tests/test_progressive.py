"""Progressive unfreezing schedules, layer-wise lr decay and the per-block parameter table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, make_imagefolder

from vfmtune.adapt.freeze import named_groups, param_table
from vfmtune.adapt.progressive import resolve_schedule
from vfmtune.choices import ConfigError
from vfmtune.commands.train import train
from vfmtune.compose import load_config, to_container
from vfmtune.tasks.classifier import Classifier


def tiny_model(*overrides: str) -> Classifier:
    cfg = to_container(load_config("backbone.name=timm/test_vit", "backbone.weights=none", "backbone.img_size=64", *overrides))
    return Classifier(cfg, ["a", "b"])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["finetune.schedule={0: head, 2: blocks.4-5, 4: all}"], {2: ["blocks.4", "blocks.5"], 4: ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]}),
        (["finetune.schedule={1: 'blocks.5,blocks.3', 3: stem}"], {1: ["blocks.5", "blocks.3"], 3: ["stem"]}),
        (["finetune.every=2", "finetune.step=3"], {2: ["blocks.3", "blocks.4", "blocks.5"], 4: ["blocks.0", "blocks.1", "blocks.2", "stem"]}),
    ],
)
def test_resolve_schedule__readable_forms(overrides: list[str], expected: dict) -> None:
    model = tiny_model("finetune=progressive", *overrides)
    assert resolve_schedule(model.config.finetune, model.backbone) == expected


@pytest.mark.parametrize(
    "schedule, message",
    [
        ("{0: head, 2: blocks.40-41}", "unknown group 'blocks.40'"),
        ("{0: head, 2: decoder}", "Valid names: head, all, stem, blocks.0..blocks.5"),
        ("{4: all, 2: blocks.5}", "out of order"),
        ("{1: blocks.5, 2: blocks.4-5}", "'blocks.5' is already trainable"),
        ("{1: all, 2: blocks.0}", "'blocks.0' is already trainable"),
        ("{2: head}", "the head trains from epoch 0"),
    ],
)
def test_bad_schedule__config_error_before_training(imagefolder: Path, tmp_path: Path, schedule: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train(overrides=[*TINY, f"data.root={imagefolder}", "finetune=progressive", f"finetune.schedule={schedule}"], run_dir=tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # nothing trained


def test_bad_schedule__already_trainable_by_mode() -> None:
    model = tiny_model("finetune=last_blocks", "finetune.n_blocks=1", "finetune.schedule={2: blocks.5}")
    with pytest.raises(ConfigError, match="'blocks.5' is already trainable"):
        resolve_schedule(model.config.finetune, model.backbone)


def test_layer_decay__lr_by_depth_from_timm_groups() -> None:
    model = tiny_model("finetune=full", "optim.lr=0.01", "optim.backbone_lr_scale=0.1", "optim.layer_decay=0.5", "sched=none")
    opt = model.configure_optimizers()
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of["head.2.weight"] == pytest.approx(0.01)
    # timm's layer map: stem 0, blocks 1..6 with the final norm in the top one: lr x 0.5 ** (6 - layer).
    assert lr_of["backbone.norm.weight"] == lr_of["backbone.blocks.5.attn.qkv.weight"] == pytest.approx(0.001)
    assert lr_of["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.001 * 0.5**5)
    assert lr_of["backbone.patch_embed.proj.weight"] == pytest.approx(0.001 * 0.5**6)
    wd = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd["backbone.blocks.0.norm1.weight"] == 0 and wd["backbone.pos_embed"] == 0 and wd["backbone.blocks.0.attn.qkv.weight"] > 0


def test_progressive_train__groups_join_with_own_lr_and_warmup(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = make_imagefolder(tmp_path / "images", {"cat": 12, "dog": 12, "owl": 12})
    result = train(
        overrides=[*TINY, f"data.root={images}", "finetune=progressive", "finetune.schedule={0: head, 1: blocks.5}",
                   "optim.layer_decay=0.5", "trainer.max_epochs=2", "sched=none", "data.batch_size=16"],
        run_dir=tmp_path,
    )
    out = capsys.readouterr().out
    assert "epoch 1: unfroze blocks.5" in out
    assert out.count("% trainable)") == 2  # the table at start and after the unfreezing step
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert len(groups) == 4  # head decay/no-decay + blocks.5 decay/no-decay
    new = [g for g in groups if g.get("warmup_steps")]
    assert new and all(g["peak_lr"] == pytest.approx(1e-3 * 0.1) for g in new)  # lr x scale x decay**0 (top block)
    assert result["metrics"]["test/macro_f1"] >= 0


def test_param_table__lists_every_block_and_lora_counts(imagefolder: Path) -> None:
    model = tiny_model("finetune=lora", "finetune.rank=4")
    table = param_table(model.backbone, model.head)
    rows = {line.split()[0]: line.split()[1:3] for line in table.splitlines()[1:]}
    assert list(named_groups(model.backbone)) == [r for r in rows if r not in ("head", "all")]
    lora = sum(p.numel() for n, p in model.backbone.named_parameters() if "lora_" in n)
    assert int(rows["blocks.0"][0].replace(",", "")) == lora // 6 and int(rows["stem"][0]) == 0
