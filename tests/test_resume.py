"""Resume equivalence: stopped mid-schedule and resumed from last.ckpt == uninterrupted (shuffled data)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY, make_imagefolder, make_mask_folder

from vfmtune.commands.distill import distill
from vfmtune.commands.train import train


class StopAfter(L.Callback):
    """Stops training after `epochs` epochs, as a crash or a Ctrl-C would (last.ckpt is already written)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class Snapshot(L.Callback):
    """What the run ends with: trainable names, optimizer groups (names, lrs) and all weights."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.trainable = sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)
        self.groups = [(sorted(names[id(p)] for p in g["params"]), g["lr"]) for g in trainer.optimizers[0].param_groups]
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.parametrize(
    "strategy",
    [
        ["finetune=progressive", "finetune.schedule={0: head, 1: blocks.4-5, 2: all}", "optim.layer_decay=0.75"],
        ["finetune=lora", "finetune.rank=4", "finetune.targets=attn_mlp", "finetune.schedule={2: blocks.5}"],
    ],
    ids=["progressive", "lora"],
)
def test_resume__equals_uninterrupted_run(tmp_path: Path, strategy: list[str]) -> None:
    # Shuffled batches with random augmentation: equal weights need the RNG state restored too.
    images = make_imagefolder(tmp_path / "images", {"cat": 16, "dog": 16, "owl": 16})
    overrides = [*TINY, f"data.root={images}", *strategy, "trainer.max_epochs=3", "data.batch_size=8",
                 "early_stopping.enabled=false", "sched.warmup_epochs=1"]
    whole, resumed = Snapshot(), Snapshot()
    train(overrides=overrides, run_dir=tmp_path / "whole", callbacks=[whole])
    train(overrides=overrides, run_dir=tmp_path / "part", callbacks=[StopAfter(2)])
    stopped = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["epoch"] == 1  # stopped mid-schedule: epoch 2 unfreezes more
    train(overrides=[*overrides, f"ckpt={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}"], run_dir=tmp_path / "resumed", callbacks=[resumed])

    assert resumed.trainable == whole.trainable
    assert [g[0] for g in resumed.groups] == [g[0] for g in whole.groups]
    assert [g[1] for g in resumed.groups] == pytest.approx([g[1] for g in whole.groups], rel=1e-9)
    assert resumed.weights.keys() == whole.weights.keys()
    for key, value in whole.weights.items():
        torch.testing.assert_close(resumed.weights[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_distill_resume__equals_uninterrupted_run(distill_runs: dict[str, Path], tmp_path: Path) -> None:
    # Augmented views (the teacher runs on every batch) and shuffling: the RNG state must come back too.
    overrides = [*TINY, "student=timm/test_efficientnet", "distill.weights=none", f"teacher={distill_runs['teacher']}",
                 "kd.feature_weight=0.5", "trainer.max_epochs=3", "early_stopping.enabled=false", "sched.warmup_epochs=1"]
    whole, resumed = Snapshot(), Snapshot()
    distill(overrides=overrides, run_dir=tmp_path / "whole", callbacks=[whole])
    distill(overrides=overrides, run_dir=tmp_path / "part", callbacks=[StopAfter(2)])
    assert torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    distill(overrides=[*overrides, f"ckpt={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}"], run_dir=tmp_path / "resumed",
            callbacks=[resumed])

    assert [g[1] for g in resumed.groups] == pytest.approx([g[1] for g in whole.groups], rel=1e-9)
    assert resumed.weights.keys() == whole.weights.keys()
    for key, value in whole.weights.items():
        torch.testing.assert_close(resumed.weights[key], value, atol=1e-6, rtol=1e-5, msg=key)


class CrashAfter(L.Callback):
    """Raises at the end of epoch `epochs` (after its last.ckpt was written), as a killed process would stop."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            raise RuntimeError("simulated crash")


def test_cached_head__checkpoints_name_the_frozen_backbone_until_fit_ends_then_hold_it(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from vfmtune.backbones import create_backbone
    from vfmtune.checkpoint import FROZEN_WEIGHTS
    from vfmtune.loading import load_model

    # Fixed weights from a file, so a rebuilt backbone is the same one (weights=none would draw new random ones).
    weights = tmp_path / "test_vit.safetensors"
    save_file(create_backbone("timm/test_vit", weights="none", img_size=64).state_dict(), str(weights))
    images = make_imagefolder(tmp_path / "images", {"cat": 16, "dog": 16, "owl": 16})
    overrides = [*TINY, f"data.root={images}", "backbone.weights=file", f"backbone.path={weights}", "trainer.max_epochs=3",
                 "early_stopping.enabled=false"]
    whole = Snapshot()
    train(overrides=overrides, run_dir=tmp_path / "whole", callbacks=[whole])
    for name in ("best", "last"):  # finished: self-contained files, as before
        ckpt = torch.load(tmp_path / "whole" / "checkpoints" / f"{name}.ckpt", weights_only=True)
        assert FROZEN_WEIGHTS not in ckpt and any(k.startswith("backbone.") for k in ckpt["state_dict"])

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(overrides=overrides, run_dir=tmp_path / "part", callbacks=[CrashAfter(2)])
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    stopped = torch.load(last, weights_only=True)
    assert stopped["epoch"] == 0 and FROZEN_WEIGHTS in stopped  # the crash came before epoch 1 was saved
    assert not any(k.startswith("backbone.") for k in stopped["state_dict"])  # the head only: KBs, not the backbone's MBs
    model = load_model(last)  # the backbone comes from the config, checked against the recorded digest
    torch.testing.assert_close(model.head.state_dict(), {k.removeprefix("head."): v for k, v in stopped["state_dict"].items()
                                                         if k.startswith("head.")})
    # Resuming fills the backbone back in from the rebuilt model (Classifier.on_load_checkpoint) and ends complete.
    # (Not compared with `whole`: cached-head resume was not bit-exact before this change either, same figures.)
    resumed = train(overrides=[*overrides, f"ckpt={last}"], run_dir=tmp_path / "resumed")
    assert resumed["metrics"]["epochs"] == 3
    done = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert FROZEN_WEIGHTS not in done and done["state_dict"].keys() == whole.weights.keys()

    other = tmp_path / "other.safetensors"
    save_file({k: v + 1 for k, v in create_backbone("timm/test_vit", weights="none", img_size=64).state_dict().items()}, str(other))
    stopped["hyper_parameters"]["config"]["backbone"]["path"] = str(other)
    torch.save(stopped, tmp_path / "moved.ckpt")
    with pytest.raises(ValueError, match="frozen backbone had weights"):
        load_model(tmp_path / "moved.ckpt")


def test_cached_tokens__segmenter_checkpoints_name_the_backbone_until_fit_ends(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from vfmtune.backbones import create_backbone
    from vfmtune.checkpoint import FROZEN_WEIGHTS
    from vfmtune.loading import load_model

    weights = tmp_path / "test_vit.safetensors"
    save_file(create_backbone("timm/test_vit", weights="none", img_size=64).state_dict(), str(weights))
    data = make_mask_folder(tmp_path / "masks", n=12)
    overrides = [*TINY, "task=segment", f"data.root={data}", "backbone.weights=file", f"backbone.path={weights}",
                 "trainer.max_epochs=3", "early_stopping.enabled=false"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(overrides=overrides, run_dir=tmp_path / "part", callbacks=[CrashAfter(2)])
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    stopped = torch.load(last, weights_only=True)
    assert FROZEN_WEIGHTS in stopped and not any(k.startswith("backbone.") for k in stopped["state_dict"])
    model = load_model(last)  # evaluate / predict rebuild the backbone from the config, checked by digest
    torch.testing.assert_close(model.head.state_dict(), {k.removeprefix("head."): v for k, v in stopped["state_dict"].items()
                                                         if k.startswith("head.")})
    resumed = train(overrides=[*overrides, f"ckpt={last}"], run_dir=tmp_path / "resumed")
    assert resumed["metrics"]["epochs"] == 3
    for name in ("best", "last"):  # finished: self-contained files
        done = torch.load(tmp_path / "resumed" / "checkpoints" / f"{name}.ckpt", weights_only=True)
        assert FROZEN_WEIGHTS not in done and any(k.startswith("backbone.") for k in done["state_dict"])


def test_seg_distill_resume__equals_uninterrupted_run(seg_distill_runs: dict[str, Path], tmp_path: Path) -> None:
    # Paired augmentation (the teacher runs on every batch) and shuffling: the RNG state must come back too.
    overrides = [*TINY, "task=segment", "student=timm/test_efficientnet", "distill.weights=none", f"teacher={seg_distill_runs['teacher']}",
                 "trainer.max_epochs=3", "early_stopping.enabled=false", "sched.warmup_epochs=1"]
    whole, resumed = Snapshot(), Snapshot()
    distill(overrides=overrides, run_dir=tmp_path / "whole", callbacks=[whole])
    distill(overrides=overrides, run_dir=tmp_path / "part", callbacks=[StopAfter(2)])
    assert torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    distill(overrides=[*overrides, f"ckpt={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}"], run_dir=tmp_path / "resumed",
            callbacks=[resumed])

    assert [g[1] for g in resumed.groups] == pytest.approx([g[1] for g in whole.groups], rel=1e-9)
    assert resumed.weights.keys() == whole.weights.keys() and all(k.startswith("student.") for k in whole.weights)
    for key, value in whole.weights.items():
        torch.testing.assert_close(resumed.weights[key], value, atol=1e-6, rtol=1e-5, msg=key)
