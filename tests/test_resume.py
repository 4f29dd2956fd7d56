"""Resume equivalence: stopped mid-schedule and resumed from last.ckpt == uninterrupted (shuffled data)."""

from __future__ import annotations

import csv
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
                 "early_stopping.enabled=false", "trainer.check_val_every_n_epoch=1"]  # best and last written every epoch
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


class Steps(Snapshot):
    """Snapshot plus how the fit stepped: optimizer steps, the final lr and the optimization mode."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.global_step, self.automatic = trainer.global_step, pl_module.automatic_optimization
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]


@pytest.mark.parametrize("sampler", ["shuffle", "balanced"])
def test_cached_head__one_step_per_epoch_trains_exactly_like_one_per_batch(tmp_path: Path, sampler: str) -> None:
    # A whole epoch of cached batches per Lightning step (EpochBatches) must be the same optimisation as Lightning's
    # per-batch loop: same batches and order, same optimizer steps and warm-up + cosine lr per step. The first run
    # fills the embedding cache and the second reads it: equal weights also say a cold cache leaves training's RNG alone.
    images = make_imagefolder(tmp_path / "images", {"cat": 20, "dog": 12, "owl": 8})
    overrides = [*TINY, f"data.root={images}", "trainer.max_epochs=4", "early_stopping.enabled=false",
                 "sched.warmup_epochs=1", f"data.sampler={sampler}"]
    whole, per_batch = Steps(), Steps()
    train(overrides=overrides, run_dir=tmp_path / "whole", callbacks=[whole])
    # Any step limit keeps Lightning's per-batch loop (whole_epoch_steps): the reference, with the same arithmetic.
    train(overrides=[*overrides, "trainer.max_steps=100000"], run_dir=tmp_path / "per_batch", callbacks=[per_batch])
    assert (whole.automatic, per_batch.automatic) == (False, True)
    assert whole.global_step == per_batch.global_step and whole.global_step % 4 == 0 and whole.global_step >= 8
    assert whole.lr == pytest.approx(per_batch.lr, rel=1e-12)
    head = [k for k in whole.weights if k.startswith("head.")]
    assert head and all(torch.equal(whole.weights[k], per_batch.weights[k]) for k in head)


@pytest.mark.parametrize(("epochs", "validated"), [(7, [4, 6]), (3, [2])])
def test_cached_head__validation_every_5th_epoch_and_the_final_one(tmp_path: Path, epochs: int, validated: list[int]) -> None:
    # finetune=frozen validates every 5th epoch and the final one (ValidateFinalEpoch), so a run shorter than the
    # cadence still has a best checkpoint; last.ckpt is the final epoch.
    images = make_imagefolder(tmp_path / "images", {"cat": 12, "dog": 12})
    run = train(overrides=[*TINY, f"data.root={images}", "finetune=frozen", f"trainer.max_epochs={epochs}"], run_dir=tmp_path / "run")
    with open(tmp_path / "run" / "logs" / "metrics.csv") as f:
        # (fit's final validate of the best weights logs one more row, at epoch `epochs`)
        assert sorted({int(r["epoch"]) for r in csv.DictReader(f) if r.get("val/macro_f1") and int(r["epoch"]) < epochs}) == validated
    checkpoints = tmp_path / "run" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == epochs - 1
    assert run["best_checkpoint"] == str(checkpoints / "best.ckpt")
    assert torch.load(checkpoints / "best.ckpt", weights_only=True)["epoch"] in validated
