"""LP-FT (finetune.head_from) and gradient checkpointing (finetune.grad_checkpointing)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY

from vfmtune.choices import ConfigError
from vfmtune.commands.train import train
from vfmtune.compose import load_config, to_container
from vfmtune.tasks.classifier import Classifier


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A frozen-head run on generated images, and the images."""
    from conftest import make_imagefolder

    base = tmp_path_factory.mktemp("probe")
    images = make_imagefolder(base / "images", {"cat": 20, "dog": 20, "owl": 20})
    run = train(overrides=[*TINY, f"data.root={images}", "trainer.max_epochs=3"], run_dir=base / "probe")
    return {"images": images, "run": Path(run["run_dir"]), "ckpt": Path(run["best_checkpoint"])}


class HeadAtStart(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.head = {k: v.clone() for k, v in pl_module.head.state_dict().items()}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_head_from__fine_tune_starts_from_the_probe_head(probe: dict, tmp_path: Path, mode: str) -> None:
    seen = HeadAtStart()
    with pytest.warns(UserWarning, match="head.feature_norm=false"):  # the fixture's probe uses the default BatchNorm
        train(overrides=[*TINY, f"data.root={probe['images']}", f"finetune={mode}", f"finetune.head_from={probe['run']}",
                         "trainer.max_epochs=1"], run_dir=tmp_path / "ft", callbacks=[seen])
    probe_head = {k.removeprefix("head."): v for k, v in torch.load(probe["ckpt"], weights_only=True)["state_dict"].items()
                  if k.startswith("head.")}
    assert probe_head.keys() == seen.head.keys()
    for k, v in probe_head.items():
        torch.testing.assert_close(seen.head[k], v)  # weights and the feature-norm running statistics


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["backbone.img_size=96"], r"backbone.img_size=64 but this run has backbone.img_size=96"),
        (["head.type=mlp"], r"head.type='linear' but this run has head.type='mlp'"),
    ],
    ids=["other_img_size", "other_head"],
)
def test_head_from__mismatch_is_config_error(probe: dict, overrides: list[str], match: str) -> None:
    cfg = to_container(load_config(*TINY, "finetune=full", *overrides))
    model = Classifier(cfg, ["cat", "dog", "owl"])
    from vfmtune.adapt.head_init import init_head_from

    with pytest.raises(ConfigError, match=match):
        init_head_from(model, probe["run"])


def test_head_from__other_classes_is_config_error(probe: dict) -> None:
    from vfmtune.adapt.head_init import init_head_from

    model = Classifier(to_container(load_config(*TINY, "finetune=full")), ["cat", "dog", "fox"])
    with pytest.raises(ConfigError, match=r"classes \['cat', 'dog', 'owl'\] differ"):
        init_head_from(model, probe["ckpt"])


def test_head_from__fine_tuned_source_is_config_error(probe: dict, tmp_path: Path) -> None:
    full = train(overrides=[*TINY, f"data.root={probe['images']}", "finetune=full", "trainer.max_epochs=1"], run_dir=tmp_path / "full")
    with pytest.raises(ConfigError, match=r"trained its backbone \(finetune.mode=full\)"):
        train(overrides=[*TINY, f"data.root={probe['images']}", "finetune=lora", f"finetune.head_from={full['run_dir']}"],
              run_dir=tmp_path / "bad")


def test_head_from__missing_run_is_config_error(tmp_path: Path) -> None:
    from vfmtune.adapt.head_init import init_head_from

    model = Classifier(to_container(load_config(*TINY, "finetune=full")), ["a", "b"])
    with pytest.raises(ConfigError, match="finetune.head_from=.*no such file"):
        init_head_from(model, tmp_path / "nope.ckpt")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_grad_checkpointing__same_gradients_as_stored_activations(mode: str) -> None:
    grads = []
    for ckpt in (False, True):
        cfg = to_container(load_config(*TINY, f"finetune={mode}", f"finetune.grad_checkpointing={ckpt}"))
        torch.manual_seed(0)
        model = Classifier(cfg, ["a", "b"])
        if mode == "lora":  # peft starts lora_B at zero, which would leave lora_A without gradient
            with torch.no_grad():
                for n, p in model.backbone.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))
        model.train()
        x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        model.loss_fn(model(x), torch.tensor([0, 1, 0, 1])).backward()
        grads.append({n: p.grad.clone() for n, p in model.backbone.named_parameters() if p.requires_grad})
        assert model.backbone.get_base_model().grad_checkpointing is ckpt if mode == "lora" else model.backbone.grad_checkpointing is ckpt
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("mode, frozen_stats", [("frozen", False), ("full", True), ("lora", True), ("progressive", True)])
def test_feature_norm__statistics_fixed_while_the_backbone_trains(probe: dict, tmp_path: Path, mode: str, frozen_stats: bool) -> None:
    seen = HeadAtStart()
    run = train(overrides=[*TINY, f"data.root={probe['images']}", f"finetune={mode}", f"finetune.head_from={probe['run']}",
                           "trainer.max_epochs=1", "finetune.cache_embeddings=false"], run_dir=tmp_path / "ft", callbacks=[seen])
    after = {k.removeprefix("head."): v for k, v in torch.load(run["best_checkpoint"], weights_only=True)["state_dict"].items()
             if k.startswith("head.0.running_")}
    assert after
    for k, v in after.items():
        assert torch.equal(v, seen.head[k]) is frozen_stats, k
