"""Freezing, parameter groups and schedules of the Classifier."""

from __future__ import annotations

import math

import pytest
import torch

from vfmtune.adapt.freeze import apply_finetune, block_groups, param_table
from vfmtune.backbones import create_backbone
from vfmtune.choices import ConfigError
from vfmtune.compose import load_config, to_container
from vfmtune.optim import cosine_with_warmup
from vfmtune.tasks.classifier import Classifier


def tiny_config(*overrides: str) -> dict:
    return to_container(load_config("backbone.name=timm/test_vit", "backbone.weights=none", "backbone.img_size=64", *overrides))


def trainable(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


@pytest.fixture
def vit() -> torch.nn.Module:
    return create_backbone("timm/test_vit", weights="none", img_size=64)


def test_frozen__nothing_in_backbone_trains_and_it_stays_in_eval(vit) -> None:
    model = Classifier(tiny_config("finetune=frozen", "backbone.drop_path_rate=0.5"), ["a", "b"])
    assert trainable(model.backbone) == set()
    model.train()
    assert not model.backbone.training and model.head.training


def test_last_blocks__only_last_n_blocks_and_final_norm(vit) -> None:
    apply_finetune(vit, "last_blocks", n_blocks=2)
    names = trainable(vit)
    assert names and all(n.startswith(("blocks.4.", "blocks.5.", "norm.")) for n in names)
    assert any(n.startswith("norm.") for n in names) and any(n.startswith("blocks.4.") for n in names)


def test_full_and_name_patterns(vit) -> None:
    apply_finetune(vit, "full", freeze=["patch_embed.*", "blocks.0.*"])
    names = trainable(vit)
    assert not any(n.startswith(("patch_embed.", "blocks.0.")) for n in names) and "blocks.1.attn.qkv.weight" in names
    apply_finetune(vit, "frozen", unfreeze=["*norm*"])
    assert trainable(vit) and all("norm" in n for n in trainable(vit))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "last_blocks", "n_blocks": 99}, "has 6 blocks"),
        ({"mode": "thaw"}, "not one of frozen"),
        ({"mode": "full", "freeze": ["decoder.*"]}, "matches no backbone parameter"),
    ],
)
def test_bad_finetune_config__clear_error(vit, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_finetune(vit, **kwargs)


@pytest.mark.parametrize("name", ["test_vit", "resnet18", "efficientnet_lite0"])
def test_block_groups__work_for_vits_and_cnns(name: str) -> None:
    backbone = create_backbone(f"timm/{name}", weights="none")
    groups = block_groups(backbone)
    assert len(groups) >= 4
    assert sum(len(g) for g in groups) == len(list(backbone.parameters()))
    apply_finetune(backbone, "last_blocks", n_blocks=1)
    assert 0 < sum(p.numel() for p in backbone.parameters() if p.requires_grad) < sum(p.numel() for p in backbone.parameters())


def test_param_table__totals(vit) -> None:
    apply_finetune(vit, "last_blocks", n_blocks=1)
    table = param_table(vit)
    total = sum(p.numel() for p in vit.parameters())
    assert f"{total:,}" in table and "blocks.5" in table and "trainable" in table


def test_optimizer__no_decay_on_norms_biases_tokens_and_lower_backbone_lr() -> None:
    model = Classifier(tiny_config("finetune=full", "optim.lr=0.01", "optim.backbone_lr_scale=0.1", "sched=none"), ["a", "b"])
    opt = model.configure_optimizers()
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        group_names = [names[id(p)] for p in group["params"]]
        if group["weight_decay"] > 0:
            assert not any("norm" in n or n.endswith((".bias", "pos_embed", "cls_token")) for n in group_names)
        in_backbone = {n.startswith("backbone.") for n in group_names}
        assert len(in_backbone) == 1
        assert group["lr"] == pytest.approx(0.001 if in_backbone == {True} else 0.01)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_cosine_with_warmup__shape() -> None:
    f = cosine_with_warmup(warmup_steps=10, total_steps=110, min_ratio=0.01)
    assert f(0) < 0.2 and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.01) and f(500) == pytest.approx(0.01)


def test_head_types() -> None:
    mlp = Classifier(tiny_config("head.type=mlp", "head.hidden_dim=16", "head.dropout=0.2"), ["a", "b", "c"])
    assert [type(m).__name__ for m in mlp.head] == ["BatchNorm1d", "Linear", "GELU", "Dropout", "Linear"]
    with pytest.raises(ConfigError, match="head.type"):
        Classifier(tiny_config("head.type=transformer"), ["a"])


@pytest.mark.parametrize("mode", ["frozen", "last_blocks"])
def test_frozen_batchnorm__statistics_unchanged_by_training(tmp_path, mode: str) -> None:
    # Lightning never calls train() at fit start; the frozen parts must still be in eval mode from the first step.
    from conftest import TINY, make_imagefolder

    from vfmtune.commands.train import train

    images = make_imagefolder(tmp_path / "img", {"cat": 12, "dog": 12})
    run = train(overrides=[*TINY, "backbone.name=timm/test_efficientnet", f"data.root={images}", f"finetune={mode}",
                           "finetune.cache_embeddings=false", "trainer.max_epochs=1"], run_dir=tmp_path / "run")
    trained = torch.load(run["best_checkpoint"], weights_only=True)["state_dict"]
    fresh = create_backbone("timm/test_efficientnet", weights="none").state_dict()
    stats = [k for k in fresh if k.endswith("running_mean") and k.startswith(("conv_stem", "bn1", "blocks.0"))]
    assert stats
    for k in stats:
        torch.testing.assert_close(trained[f"backbone.{k}"], fresh[k], msg=k)
