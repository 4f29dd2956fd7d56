"""LoRA via peft: presets, DoRA, peft-standard adapters, loading back, merging with a numeric check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY

from vfmtune.adapt.lora import merge_lora
from vfmtune.choices import ConfigError
from vfmtune.commands.evaluate import evaluate
from vfmtune.commands.merge import export_merged
from vfmtune.commands.train import train
from vfmtune.compose import load_config, to_container
from vfmtune.loading import load_model
from vfmtune.tasks.classifier import Classifier
from vfmtune.tasks.classify import load_adapter_run as load_adapter


def lora_model(*overrides: str) -> Classifier:
    cfg = to_container(load_config("backbone.name=timm/test_vit", "backbone.weights=none", "backbone.img_size=64", "finetune=lora", *overrides))
    return Classifier(cfg, ["a", "b"])


@pytest.mark.parametrize(
    "targets, expected",
    [
        ("attn", {"attn.qkv", "attn.proj"}),
        ("attn_mlp", {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}),
        ("[mlp.fc2]", {"mlp.fc2"}),
    ],
)
def test_lora_targets__presets_and_names(targets: str, expected: set[str]) -> None:
    model = lora_model(f"finetune.targets={targets}")
    adapted = {n.split(".", 2)[2].rsplit(".lora_A", 1)[0] for n, _ in model.backbone.get_base_model().named_parameters() if ".lora_A." in n}
    assert {a.rsplit(".default", 1)[0] for a in adapted} == expected
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the base backbone stays frozen


def test_lora_targets__unknown_name_is_config_error() -> None:
    with pytest.raises(ConfigError, match="'attn.q_proj' matches no linear layer"):
        lora_model("finetune.targets=[attn.q_proj]")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge__merged_equals_unmerged(dora: bool) -> None:
    model = lora_model(f"finetune.use_dora={dora}")
    with torch.no_grad():  # non-zero adapters, as after training (peft initialises B to zero)
        for n, p in model.backbone.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    merged, diff = merge_lora(model, atol=1e-4, img_size=64)
    assert diff < 1e-4 and not any("lora" in n for n, _ in merged.named_parameters())


def test_merge__fails_above_tolerance() -> None:
    model = lora_model()
    with torch.no_grad():
        for n, p in model.backbone.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    with pytest.raises(ValueError, match=r"max abs logit diff .* > merge_atol=1e-12"):
        merge_lora(model, atol=1e-12, img_size=64)  # float32 merging is never that exact


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_imagefolder

    root = tmp_path_factory.mktemp("lora")
    images = make_imagefolder(root / "images", {"cat": 16, "dog": 16, "owl": 16})
    train(overrides=[*TINY, f"data.root={images}", "finetune=lora", "optim.backbone_lr_scale=1.0", "trainer.max_epochs=1"], run_dir=root / "run")
    return root


def test_lora_run__saves_peft_standard_adapter_plus_head(lora_run: Path) -> None:
    adapter = lora_run / "run" / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "head.safetensors", "vfmtune.json"} <= {p.name for p in adapter.iterdir()}
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    full = (lora_run / "run" / "checkpoints" / "best.ckpt").stat().st_size
    assert (adapter / "adapter_model.safetensors").stat().st_size < 0.2 * full


def test_lora_adapter__loads_back_with_same_outputs(lora_run: Path) -> None:
    from_ckpt, from_adapter = load_model(lora_run / "run"), load_adapter(lora_run / "run" / "adapter")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(from_adapter(x), from_ckpt(x))


def test_lora_adapter__other_backbone_is_clear_error(lora_run: Path) -> None:
    with pytest.raises(ConfigError, match="trained on backbone 'timm/test_vit'"):
        load_adapter(lora_run / "run" / "adapter", backbone_overrides={"name": "timm/test_vit2"})


def test_export_merged__plain_checkpoint_that_evaluate_loads(lora_run: Path) -> None:
    result = export_merged(overrides=[f"ckpt={lora_run / 'run'}"], run_dir=lora_run / "merged")
    assert result["max_abs_diff"] < 1e-4
    merged = evaluate(overrides=[f"ckpt={result['checkpoint']}", "trainer.accelerator=cpu"], run_dir=lora_run / "eval")["metrics"]
    original = json.loads((lora_run / "run" / "metrics.json").read_text())
    assert merged["test/macro_f1"] == pytest.approx(original["test/macro_f1"])
