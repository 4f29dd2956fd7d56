"""End-to-end imbalance features through the real CLI: losses, sampling, resampling, cv, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_imagefolder, read_rows
from PIL import Image

from vfmtune.cli import main
from vfmtune.loading import load_model
from vfmtune.tasks.ensemble import Ensemble

COUNTS = {"cat": 40, "dog": 10, "owl": 10}  # 4:1 imbalance; 7 dog / 7 owl images in the training split


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("skewed") / "images", COUNTS)


def split_counts(run: Path) -> dict[str, Counter]:
    rows = read_rows(run / "splits.csv")
    return {s: Counter(r["label"] for r in rows if r["split"] == s) for s in ("train", "val", "test")}


def test_train__weighted_ce_balanced_sampler__reports_and_checkpoint(skewed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    main(["train", *TINY, f"data.root={skewed}", "loss=weighted_ce", "data.sampler=balanced", f"hydra.run.dir={run}"])
    out = capsys.readouterr().out
    assert any(line.split() == ["class", "train", "val", "test"] for line in out.splitlines())  # distribution printed first
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("test/balanced_accuracy", "test/macro_f1", "test/recall/owl", "test/precision/dog", "test/f1/cat"):
        assert 0.0 <= metrics[key] <= 1.0
    for name in ("per_class_test.png", "per_class_val.png", "confusion_matrix_test.png"):
        assert Image.open(run / "plots" / name).size[0] > 100
    train = split_counts(run)["train"]
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["class_counts"] == [train["cat"], train["dog"], train["owl"]]
    model = load_model(run)  # rebuilds the weighted loss from the stored training counts
    expected = sum(train.values()) / (3 * torch.tensor([train["cat"], train["dog"], train["owl"]], dtype=torch.float32))
    assert torch.allclose(model.loss_fn.weight, expected)


def test_resample__training_split_only_val_and_test_untouched(skewed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    main(["train", *TINY, f"data.root={skewed}", "resample=random_over", "trainer.max_epochs=1", f"hydra.run.dir={run}"])
    counts = split_counts(run)
    assert f"cat {counts['train']['cat']}->{counts['train']['cat']}, dog {counts['train']['dog']}->{counts['train']['cat']}" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):  # the evaluated samples per class are exactly the split's images
        supports = [sum(row) for row in metrics[f"{split}/confusion_matrix"]]
        assert supports == [counts[split][c] for c in ("cat", "dog", "owl")]


def test_oversample_augment__frozen_backbone_runs_on_images(skewed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    main(["train", *TINY, f"data.root={skewed}", "data.sampler=balanced", "data.oversample_augment=true", "trainer.max_epochs=1", f"hydra.run.dir={run}"])
    assert "embeddings ready" not in capsys.readouterr().out  # no cache: each draw is a freshly augmented image
    assert (run / "metrics.json").is_file()


def _manifest_without_owl_in_train(tmp_path: Path, images: Path) -> Path:
    path = tmp_path / "list.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for cls in COUNTS:
            for i, p in enumerate(sorted((images / cls).iterdir())):
                w.writerow([p, cls, ("val", "test")[i % 2] if cls == "owl" else ("train", "train", "val", "test")[i % 4]])
    return path


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("train", ["MANIFEST"], "Class 'owl' has no images in the training split"),
        ("train", ["loss=weighted_ce", "loss.class_weights=[1,2]"], "loss.class_weights has 2 values but the data has 3 classes"),
        ("train", ["resample=smote", "resample.k_neighbors=9"], "needs more than 9 training samples in every class it oversamples; 'dog' has 7"),
        ("train", ["resample=smote", "finetune=last_blocks"], "needs a frozen backbone"),
        ("train", ["data.oversample_augment=true"], "needs data.sampler=balanced"),
        ("cv", ["folds=20"], "folds=20 is larger than the smallest class: 'dog' has 8"),
    ],
)
def test_bad_input__clear_error_before_training(
    command: str, args: list[str], message: str, skewed: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = f"data.manifest={_manifest_without_owl_in_train(tmp_path, skewed)}" if args == ["MANIFEST"] else f"data.root={skewed}"
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main([command, *TINY, data, *[a for a in args if a != "MANIFEST"], f"hydra.run.dir={run}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(run.rglob("*.ckpt"))  # stopped before training


def test_cv__folds_mean_std_and_ensemble_for_evaluate_and_predict(skewed: Path, tmp_path: Path) -> None:
    run = tmp_path / "cv"
    main(["cv", *TINY, f"data.root={skewed}", "folds=3", "trainer.max_epochs=3", f"hydra.run.dir={run}"])
    folds = read_rows(run / "folds.csv")
    test_rows = {r["path"] for r in folds if r["fold"] == "test"}
    per_fold = Counter((r["fold"], r["label"]) for r in folds if r["fold"] != "test")
    for cls in COUNTS:  # stratified: every fold holds about a third of every class
        sizes = [per_fold[(str(k), cls)] for k in range(3)]
        assert max(sizes) - min(sizes) <= 1
    for k in range(3):
        rows = read_rows(run / f"fold_{k}" / "splits.csv")
        assert {r["path"] for r in rows if r["split"] == "test"} == test_rows  # test held out of every fold
        assert {r["path"] for r in rows if r["split"] == "val"} == {r["path"] for r in folds if r["fold"] == str(k)}
        assert (run / f"fold_{k}" / "checkpoints" / "best.ckpt").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    fold_ba = [json.loads((run / f"fold_{k}" / "metrics.json").read_text())["test/balanced_accuracy"] for k in range(3)]
    assert metrics["test/balanced_accuracy/mean"] == pytest.approx(sum(fold_ba) / 3)
    assert metrics["test/balanced_accuracy/std"] == pytest.approx(float(torch.tensor(fold_ba).std(unbiased=False)))
    assert {"val/macro_f1/mean", "test/recall/owl/std", "ensemble/test/macro_f1", "ensemble/test/confusion_matrix"} <= set(metrics)
    assert (run / "plots" / "per_class_test.png").is_file()

    model = load_model(run)
    assert isinstance(model, Ensemble) and len(model.members) == 3 and model.head is not None
    main(["evaluate", f"ckpt={run}", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'eval'}"])
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["test/confusion_matrix"] == metrics["ensemble/test/confusion_matrix"]
    main(["predict", f"ckpt={run}", f"images={skewed / 'owl'}", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'pred'}"])
    rows = read_rows(tmp_path / "pred" / "predictions.csv")
    assert len(rows) == COUNTS["owl"]
    assert all(abs(sum(float(r[f"p_{c}"]) for c in COUNTS) - 1) < 1e-4 for r in rows)


@pytest.mark.slow
def test_ddp__two_cpu_processes_balanced_sampler_through_cli(skewed: Path, tmp_path: Path) -> None:
    # Lightning's DDP launcher re-executes the CLI for rank 1; the CLI must hand it its command.
    run = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "vfmtune.cli", "train", *TINY, "trainer=ddp_cpu", "trainer.max_epochs=1", "data.sampler=balanced",
         f"data.root={skewed}", f"hydra.run.dir={run}"],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "metrics.json").is_file()
    assert (run / "train_ddp_process_1.log").is_file()  # the second rank ran
