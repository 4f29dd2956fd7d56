"""Domain shift: the camera model, the shift report, and adaptation (CORAL, DANN, self-training, AdaBN,
TENT) on a synthetic shift that the report detects and adaptation reduces."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, make_imagefolder
from PIL import Image

from vfmtune.camera_shift import shift_folder, through_camera
from vfmtune.cli import main
from vfmtune.self_training import select_pseudo_labels
from vfmtune.shift_stats import domain_auc, mmd_test


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Source images, a classifier trained on them, and the target domain (severity-2 camera): an
    unlabelled pool (shifted copies of other source-like images) and a labelled test folder."""
    base = tmp_path_factory.mktemp("domain")
    source = make_imagefolder(base / "source", {"cat": 24, "dog": 24, "owl": 24}, seed=0)
    fresh = make_imagefolder(base / "fresh", {"cat": 16, "dog": 16, "owl": 16}, seed=1)
    labelled = make_imagefolder(base / "labelled", {"cat": 10, "dog": 10, "owl": 10}, seed=2)
    shift_folder(sorted(str(p) for p in fresh.rglob("*.png")), base / "pool", severity=2, seed=0, root=str(fresh))
    shift_folder(sorted(str(p) for p in labelled.rglob("*.png")), base / "target_test", severity=2, seed=1, root=str(labelled))
    # Validated every epoch, the best checkpoint is the first to reach the top val score: a probe the camera
    # change still hurts (the preset's every-5th-epoch cadence keeps a later one that classifies both perfectly).
    main(["train", *TINY, f"data.root={source}", "trainer.max_epochs=20", "optim.lr=1e-2", "trainer.check_val_every_n_epoch=1",
          f"hydra.run.dir={base / 'run'}"])
    return {"base": base, "source": source, "fresh": fresh, "pool": base / "pool", "target_test": base / "target_test",
            "run": base / "run"}


def test_camera__deterministic_and_stronger_with_severity() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    a, b = np.asarray(through_camera(image, 2, seed=3)), np.asarray(through_camera(image, 2, seed=3))
    assert np.array_equal(a, b)
    base = np.asarray(image, dtype=float)
    d1 = np.abs(np.asarray(through_camera(image, 1, 3), dtype=float) - base).mean()
    d2 = np.abs(a.astype(float) - base).mean()
    assert 0 < d1 < d2


def test_mmd_and_domain_auc__tell_shift_from_sampling_noise() -> None:
    rng = np.random.default_rng(0)
    x, same, moved = rng.normal(size=(80, 8)), rng.normal(size=(80, 8)), rng.normal(size=(80, 8)) + 0.8
    assert mmd_test(x, same, permutations=100)["mmd_p_value"] > 0.05 and mmd_test(x, moved, permutations=100)["mmd_p_value"] < 0.05
    assert domain_auc(x, same) < 0.7 < 0.9 < domain_auc(x, moved)


def test_adapt_batchnorm__exact_statistics_whatever_the_batch_order() -> None:
    from torch import nn

    from vfmtune.adapt.domain import adapt_batchnorm

    torch.manual_seed(0)
    x = torch.cat([torch.randn(24, 16) * 0.1, torch.randn(24, 16) * 0.1 + 1])  # a folder sorted by class
    for order in (torch.arange(48), torch.randperm(48)):
        bn = nn.BatchNorm1d(16, affine=False)
        assert adapt_batchnorm(nn.Sequential(bn, nn.Linear(16, 3)), x[order].split(8)) == 1
        # per-batch variances average to ~0.01 for the sorted order; the data's variance is ~0.26
        torch.testing.assert_close(bn.running_var, x.var(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(bn.running_mean, x.mean(0), rtol=1e-4, atol=1e-6)


def test_select_pseudo_labels__confident_and_class_balanced() -> None:
    probs = torch.tensor([[0.99, 0.01], [0.95, 0.05], [0.9, 0.1], [0.3, 0.7], [0.08, 0.92], [0.6, 0.4]])
    assert select_pseudo_labels(probs, 0.85) == ([0, 4], [0, 1])  # class 1 has one confident image: one each
    assert select_pseudo_labels(probs, 0.85, per_class=2) == ([0, 1, 4], [0, 0, 1])


def test_shift_report__detects_the_camera_change(domains: dict[str, Path], tmp_path: Path, capsys) -> None:
    main(["shift", f"ckpt={domains['run']}", f"target={domains['target_test']}", f"hydra.run.dir={tmp_path / 'shifted'}"])
    assert "adapt.keep_source=true" in capsys.readouterr().out  # separable domains: the one-model remedy is named
    main(["shift", f"ckpt={domains['run']}", f"target={domains['fresh']}", f"hydra.run.dir={tmp_path / 'same'}"])
    assert "adapt.keep_source=true" not in capsys.readouterr().out
    shifted = json.loads((tmp_path / "shifted" / "shift.json").read_text())
    same = json.loads((tmp_path / "same" / "shift.json").read_text())
    # 50 vs 30 images: the domain classifier sees the camera clearly; MMD only orders the two targets
    assert shifted["domain_auc"] > 0.9 and same["domain_auc"] < 0.75
    assert same["mmd2"] < shifted["mmd2"] and same["mmd_p_value"] > shifted["mmd_p_value"]
    assert "target/macro_f1" in shifted and shifted["n_target"] == 30  # the labelled folder is also scored
    assert same["target/macro_f1"] > shifted["target/macro_f1"]  # the camera change costs accuracy
    for name in ("shift_map.png", "shift_confidence.png"):
        assert Image.open(tmp_path / "shifted" / "plots" / name).size[0] > 100


def test_adabn__measurably_reduces_the_shift(domains: dict[str, Path], tmp_path: Path) -> None:
    # The frozen probe normalises features with BatchNorm: re-estimated on target images, it re-centres them.
    main(["adapt", f"ckpt={domains['run']}", f"data.target={domains['pool']}", "adapt.method=adabn",
          f"data.target_test={domains['target_test']}", f"hydra.run.dir={tmp_path}"])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["target/macro_f1"] > m["before/target/macro_f1"] + 0.05
    assert {"test/macro_f1", "before/test/macro_f1"} <= set(m)  # source and target side by side
    ckpt = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["adapted"]["method"] == "adabn"


def test_adabn_keep_source__one_checkpoint_serves_both_cameras(domains: dict[str, Path], tmp_path: Path) -> None:
    main(["adapt", f"ckpt={domains['run']}", f"data.target={domains['pool']}", "adapt.method=adabn", "adapt.keep_source=true",
          f"data.target_test={domains['target_test']}", f"hydra.run.dir={tmp_path / 'routed'}"])
    main(["adapt", f"ckpt={domains['run']}", f"data.target={domains['pool']}", "adapt.method=adabn",
          f"data.target_test={domains['target_test']}", f"hydra.run.dir={tmp_path / 'swapped'}"])
    routed = json.loads((tmp_path / "routed" / "metrics.json").read_text())
    swapped = json.loads((tmp_path / "swapped" / "metrics.json").read_text())
    # each camera's images find their own statistics: the source keeps its score, the target gets AdaBN's
    assert routed["routing/target_pool_as_target"] > 0.9 and routed["routing/source_train_as_source"] > 0.9
    assert routed["test/macro_f1"] >= routed["before/test/macro_f1"] - 0.05
    assert routed["target/macro_f1"] >= swapped["target/macro_f1"] - 0.05
    from vfmtune.adapt.routed_norm import RoutedBatchNorm
    from vfmtune.loading import load_model

    model = load_model(tmp_path / "routed")  # reloads with both rows of statistics
    assert isinstance(model.head[0], RoutedBatchNorm) and model.head[0].running_mean.shape[0] == 2
    # the export routes as the checkpoint does: the ONNX bundle's logits on target-camera images match torch's
    main(["export", f"ckpt={tmp_path / 'routed'}", "format=onnx", f"hydra.run.dir={tmp_path / 'export'}"])
    from vfmtune.data.datamodule import ImageDataset
    from vfmtune.inference import run_inference
    from vfmtune.runtime import Predictor
    from vfmtune.tasks.classify import eval_transform

    images = sorted(str(p) for p in domains["target_test"].rglob("*.png"))
    onnx = Predictor(tmp_path / "export" / "bundle").logits(images)
    torch_logits = run_inference(model, ImageDataset(images, [0] * len(images), eval_transform(model)), model.config).numpy()
    np.testing.assert_allclose(onnx, torch_logits, atol=1e-3, rtol=1e-3)


def test_adabn_on_a_distilled_student__every_batchnorm_moves(domains: dict[str, Path], distill_runs: dict[str, Path],
                                                             tmp_path: Path, capsys) -> None:
    main(["adapt", f"ckpt={distill_runs['student']}", f"data.target={domains['pool']}", "adapt.method=adabn",
          f"data.target_test={domains['target_test']}", f"hydra.run.dir={tmp_path}"])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert {"before/test/macro_f1", "test/macro_f1", "before/target/macro_f1", "target/macro_f1"} <= set(m)
    moved = int(capsys.readouterr().out.split("AdaBN: ")[1].split()[0])
    assert moved > 5  # the CNN's BatchNorms, not just a head
    from vfmtune.loading import load_model

    before, after = load_model(distill_runs["student"]), load_model(tmp_path)
    changed = [k for k, v in after.state_dict().items() if k.endswith("running_mean") and not torch.equal(v, before.state_dict()[k])]
    assert len(changed) == moved


def test_keep_source_without_a_frozen_probe__refused(domains: dict[str, Path], tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["adapt", f"ckpt={domains['run']}", f"data.target={domains['pool']}", "adapt.method=tent", "adapt.keep_source=true",
              f"hydra.run.dir={tmp_path}"])
    assert "adapt.keep_source=true routes a frozen probe" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["coral", "dann"])
def test_feature_alignment__trains_and_reports_source_and_target(domains: dict[str, Path], tmp_path: Path, method: str) -> None:
    main(["train", *TINY, f"data.root={domains['source']}", "finetune=last_blocks", "finetune.n_blocks=1", "trainer.max_epochs=2",
          f"data.target={domains['pool']}", f"data.target_test={domains['target_test']}", f"adapt.method={method}",
          f"hydra.run.dir={tmp_path}"])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= m["target/macro_f1"] <= 1 and 0 <= m["test/macro_f1"] <= 1
    logged = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "train/align" in logged and "train/task" in logged


def test_self_training__rounds_with_pseudo_labels(domains: dict[str, Path], tmp_path: Path) -> None:
    main(["train", *TINY, f"data.root={domains['source']}", "trainer.max_epochs=10", "optim.lr=1e-2", f"data.target={domains['pool']}",
          f"data.target_test={domains['target_test']}", "adapt.method=self_training", "adapt.rounds=1", "adapt.threshold=0.5",
          f"hydra.run.dir={tmp_path}"])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["self_training/round_1/pseudo_labels"] > 0 and "target/macro_f1" in m
    assert (tmp_path / "round_0" / "metrics.json").is_file() and (tmp_path / "checkpoints" / "best.ckpt").is_file()
    from vfmtune.loading import load_model

    assert load_model(tmp_path).classes == ["cat", "dog", "owl"]


def test_target_pool_with_a_test_image__refused(domains: dict[str, Path], tmp_path: Path, capsys) -> None:
    pool = tmp_path / "pool"
    shutil.copytree(domains["pool"], pool)
    test_image = next(p for p in (domains["run"] / "splits.csv").read_text().splitlines() if p.endswith(",test")).split(",")[0]
    shutil.copy(test_image, pool / "leaked.png")
    with pytest.raises(SystemExit):
        main(["adapt", f"ckpt={domains['run']}", f"data.target={pool}", "adapt.method=adabn", f"hydra.run.dir={tmp_path / 'run'}"])
    assert "leaked.png" in capsys.readouterr().err


def test_bad_adaptation_settings__clear_errors(domains: dict[str, Path], tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):  # a frozen backbone's features cannot move
        main(["train", *TINY, f"data.root={domains['source']}", f"data.target={domains['pool']}", "adapt.method=coral",
              f"hydra.run.dir={tmp_path / 'a'}"])
    assert "finetune=lora, last_blocks or full" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # post-hoc methods belong to `vfmtune adapt`
        main(["train", *TINY, f"data.root={domains['source']}", "adapt.method=tent", f"hydra.run.dir={tmp_path / 'b'}"])
    assert "vfmtune adapt ckpt=RUN" in capsys.readouterr().err
