"""End-to-end: every command through the real CLI (Hydra, Lightning, timm) on generated images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, read_rows
from PIL import Image

from vfmtune.cli import main


def run_cli(*args: str) -> None:
    main(list(args))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One real training run shared by the evaluate / predict tests."""
    from conftest import make_imagefolder

    base = tmp_path_factory.mktemp("trained")
    images = make_imagefolder(base / "images", {"cat": 30, "dog": 30, "owl": 30})
    run = base / "run"
    run_cli(
        "train", *TINY, f"data.root={images}", "finetune=last_blocks", "finetune.n_blocks=1",
        "trainer.max_epochs=5", "optim.lr=5e-3", f"hydra.run.dir={run}",
    )
    return images, run


def test_train__writes_run_directory(trained: tuple[Path, Path]) -> None:
    _, run = trained
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("test/accuracy", "test/balanced_accuracy", "test/macro_f1", "val/macro_f1", "test/recall/cat", "test/f1/owl"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # Colour-coded classes are easy: a real training loop must learn them.
    assert metrics["test/macro_f1"] > 0.8
    assert len(metrics["test/confusion_matrix"]) == 3
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (run / "splits.csv").is_file()
    for name in ("confusion_matrix_test.png", "confusion_matrix_val.png", "curves.png"):
        assert Image.open(run / "plots" / name).size[0] > 100
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = torch.load(run / "checkpoints" / name, weights_only=True)  # plain types only
        assert ckpt["hyper_parameters"]["classes"] == ["cat", "dog", "owl"]


def test_evaluate__recomputes_test_metrics(trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = trained
    out = tmp_path / "eval"
    run_cli("evaluate", f"ckpt={run / 'checkpoints' / 'best.ckpt'}", "trainer.enable_progress_bar=false", f"hydra.run.dir={out}")
    train_metrics = json.loads((run / "metrics.json").read_text())
    eval_metrics = json.loads((out / "metrics.json").read_text())
    assert eval_metrics["test/macro_f1"] == pytest.approx(train_metrics["test/macro_f1"])
    assert eval_metrics["test/confusion_matrix"] == train_metrics["test/confusion_matrix"]


def test_evaluate__writes_per_image_predictions(trained: tuple[Path, Path], tmp_path: Path) -> None:
    import vfmtune

    _, run = trained
    result = vfmtune.evaluate(overrides=[f"ckpt={run}", "split=val", "trainer.enable_progress_bar=false"], run_dir=tmp_path / "e")
    rows = read_rows(tmp_path / "e" / "predictions.csv")
    assert set(rows[0]) == {"path", "label", "class", "p_cat", "p_dog", "p_owl"}
    assert [r["path"] for r in rows] == result["paths"] and result["probs"].shape == (len(rows), 3)
    assert result["classes"] == ["cat", "dog", "owl"]
    right = sum(r["label"] == r["class"] for r in rows) / len(rows)
    assert right == pytest.approx(result["metrics"]["val/accuracy"])


def test_evaluate__other_data_all_split(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from conftest import make_imagefolder

    _, run = trained
    other = make_imagefolder(tmp_path / "other", {"cat": 5, "owl": 5}, seed=7)
    run_cli("evaluate", f"ckpt={run}", f"data.root={other}", "split=all", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'e'}")
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert sum(map(sum, metrics["all/confusion_matrix"])) == 10


def test_predict__writes_probabilities_csv(trained: tuple[Path, Path], tmp_path: Path) -> None:
    images, run = trained
    out = tmp_path / "pred"
    run_cli("predict", f"ckpt={run}", f"images={images / 'owl'}", "trainer.enable_progress_bar=false", f"hydra.run.dir={out}")
    rows = read_rows(out / "predictions.csv")
    assert len(rows) == 30
    assert set(rows[0]) == {"path", "class", "p_cat", "p_dog", "p_owl"}
    assert all(abs(sum(float(r[f"p_{c}"]) for c in ("cat", "dog", "owl")) - 1) < 1e-4 for r in rows)
    assert sum(r["class"] == "owl" for r in rows) >= 24


def test_embed__builds_cache_then_train_reuses_it(imagefolder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_cli("embed", *TINY, f"data.root={imagefolder}", f"hydra.run.dir={tmp_path / 'embed'}")
    assert "embedding 120 images" in capsys.readouterr().err
    run_cli("train", *TINY, f"data.root={imagefolder}", f"hydra.run.dir={tmp_path / 'train'}")
    captured = capsys.readouterr()
    assert "embedding" not in captured.err  # every image was a cache hit
    assert (tmp_path / "train" / "metrics.json").is_file()


def test_cfg_job__prints_composed_config(capsys: pytest.CaptureFixture) -> None:
    run_cli("train", "backbone=vit_b16", "optim.lr=0.5", "--cfg", "job")  # prints, trains nothing
    out = capsys.readouterr().out
    assert "name: vit_b16" in out and "lr: 0.5" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["data.rot=/x"], "Valid keys at data: augment, batch_size"),
        (["nope=1"], "Valid keys at the top level: adapt, backbone"),
        (["backbone=nope"], "dinov2_vitb14"),
        (["recipes=nope"], "dinov2_vits14_frozen_textile"),
    ],
)
def test_bad_override__exits_2_naming_valid_choices(args: list[str], expected: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli("train", *args)
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err


def test_unknown_trainer_key__names_valid_ones(imagefolder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli("train", *TINY, f"data.root={imagefolder}", "+trainer.max_epoch=3", f"hydra.run.dir={tmp_path}")
    assert exc.value.code == 2
    assert "trainer.max_epoch" in capsys.readouterr().err


def test_unknown_backbone_alias__lists_aliases(imagefolder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli("train", *TINY, "backbone.name=dinov3_tiny", f"data.root={imagefolder}", f"hydra.run.dir={tmp_path}")
    assert exc.value.code == 2
    assert "dinov2_vits14" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [(["finetune.mode=lorra"], "'lorra', expected one of [frozen, last_blocks, full, progressive, lora]"),
     (["teacher=runs/x"], "Unknown key 'teacher'. Valid keys at the top level: adapt, backbone")],
    ids=["enum_value", "other_commands_key"],
)
def test_bad_override__one_line_with_valid_choices(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli("train", *TINY, *args, f"hydra.run.dir={tmp_path}")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    # train's own keys only: distill's `teacher` is not offered as a valid train key
    assert "teacher" not in err.partition("Valid keys")[2]


def test_multirun__one_run_dir_per_job(imagefolder: Path, tmp_path: Path) -> None:
    # a config-group sweep (checked with its first option before Hydra launches a job per option)
    run_cli("train", "-m", *TINY, f"data.root={imagefolder}", "optim=adamw,sgd", "optim.lr=0.01", f"hydra.sweep.dir={tmp_path}")
    assert sorted(p.name for p in tmp_path.iterdir() if (p / "metrics.json").is_file()) == ["0", "1"]


def test_bad_image__stops_with_report_or_skips_and_counts(imagefolder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = imagefolder / "dog" / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(SystemExit) as exc:
        run_cli("train", *TINY, f"data.root={imagefolder}", f"hydra.run.dir={tmp_path / 'a'}")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "on_bad_image=skip" in err and "Traceback" not in err
    run_cli("train", *TINY, f"data.root={imagefolder}", "data.on_bad_image=skip", f"hydra.run.dir={tmp_path / 'b'}")
    assert "broken.jpg" in capsys.readouterr().out
    assert (tmp_path / "b" / "metrics.json").is_file()
    assert "broken.jpg" not in (tmp_path / "b" / "splits.csv").read_text()


def test_console_script__help_and_unknown_command() -> None:
    ok = subprocess.run([sys.executable, "-m", "vfmtune.cli", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "commands:" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "vfmtune.cli", "fly"], capture_output=True, text=True)
    assert bad.returncode == 2 and "valid commands: train" in bad.stderr


def test_logger_tensorboard__writes_event_file(imagefolder: Path, tmp_path: Path) -> None:
    run_cli("train", *TINY, f"data.root={imagefolder}", "logger=tensorboard", f"hydra.run.dir={tmp_path}")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
